"""Print the planner tables of docs/scaling.md (run from the repository root):

    python docs/scaling/plan_tables.py > /tmp/tables.md

Each cell is the first mesh shape `jaxdetox plan ... --device-kind K --num-devices N` suggests
(least tensor, then least fsdp, among those that fit) with its peak GiB per device and stage.
"""

from __future__ import annotations

from jaxdetox.config import load_config
from jaxdetox.planning import memory
from jaxdetox.planning.plan import planner

BASE = "experiments/tiny/pr_sequential.yaml"
RECIPE = [
    "model.dtype=bfloat16",  # compute in bf16, float32 master weights and Adam moments
    "finetune.reference_dtype=bfloat16",
    "nado.num_layers=8",  # the authors' LLaMA NADO: 8 layers
    "sampling.max_new_tokens=32",
    "sampling.batch_size=32",
    "finetune.batch_size=64",
    "train_nado.batch_size=64",
    "eval.num_samples=25",
    "eval.batch_size=16",
]
MODELS = {"Llama-3.2-1B": "llama-3.2-1b", "Llama-2-7B": "llama-2-7b", "Llama-2-13B": "llama-2-13b"}
TARGETS = [  # (column, device kind, devices = JAX devices = chips / GPUs)
    ("1 x H100", "h100-80gb", 1),
    ("8 x H100", "h100-80gb", 8),
    ("v4-8", "v4", 4),
    ("v4-32", "v4", 16),
    ("v5e-16", "v5e", 16),
    ("v5p-128", "v5p", 64),
]


def overrides(arch: str, remat: bool) -> list[str]:
    """The recipe for one architecture."""
    path = f"docs/scaling/architectures/{arch}"
    return [*RECIPE, f"model.path={path}", f"model.remat={str(remat).lower()}"]


def cell(p: memory.Planner, kind: str, n: int) -> str:
    """The first suggested shape that fits, or the smallest peak when none does."""
    device = memory.device_kind(kind)
    rows = memory.suggest([p], n, device, top=len(memory.mesh_shapes(n)))
    fits = [(s, pl[0]) for s, pl in rows if pl[0].peak.total <= device.budget]
    if fits:
        s, plan = fits[0]
        return f"{s['data']}×{s['fsdp']}×{s['tensor']}: {plan.peak.total / 2**30:.1f}"
    s, plan = min(((s, pl[0]) for s, pl in rows), key=lambda x: x[1].peak.total)
    return f"none ({plan.peak.total / 2**30:.0f} at {s['data']}×{s['fsdp']}×{s['tensor']})"


def main() -> None:
    """Print one markdown table per remat setting, then 7B's per-stage table on 8 x H100."""
    for remat in (False, True):
        print(f"\n**remat {'on' if remat else 'off'}** (data×fsdp×tensor: peak GiB per device)\n")
        print("| model | " + " | ".join(t[0] for t in TARGETS) + " |")
        print("|---|" + "---|" * len(TARGETS))
        for label, arch in MODELS.items():
            p = planner(load_config(BASE, overrides(arch, remat)))
            print(f"| {label} | " + " | ".join(cell(p, k, n) for _, k, n in TARGETS) + " |")
    p = planner(load_config(BASE, overrides("llama-2-7b", True)))
    plan = p.plan({"data": 1, "fsdp": 8, "tensor": 1})
    print("\n```\n" + memory.format_plan(plan, memory.device_kind("h100-80gb")) + "\n```")


if __name__ == "__main__":
    main()
