"""Sequential vs parallel iteration time, measured: one small run per scheme and placement.

    python -m benchmarks.schemes_bench [--iterations 4] [--out benchmarks/results/schemes.json]

The same tiny random Llama (tests/_tiny_run.py) and recipe run four ways, each in its own
process with 8 fake CPU devices:

- `sequential` colocated: an iteration costs the sum of its stages;
- `parallel` colocated: the pipelined data flow, stages still one after another;
- `parallel` split: sampler / NADO trainer / LLM trainer as threads on 4 + 2 + 2 devices;
- `parallel` jobs: one process per role (2 devices each), meeting in the run directory;
- `parallel` joint: colocated, each iteration's train_nado + finetune (from iteration 2) as
  one joint stage (`pipeline/joint.py`, one `joint_step` program per step).

Per run it reports, from the manifest, the wall time per iteration after the first
(`evaluate.runs.steady_iteration_time`: the time between consecutive iterations' ends), the
mean sum of an iteration's stages and its slowest stage, and the modelled pod schedule of
`benchmarks.schedule` (sequential Σ stages vs parallel max lane + hand-over, each role on its
own devices). The issue's goal: parallel iteration ≤ 1.15 × the slowest stage. On a 2-core
machine the roles share the cores, so the measured overlap is bounded by the cores, not the
scheme; the modelled schedule is what disjoint devices give.

The joint stage against the two separate stages: per iteration from 2 on, the training
records' seconds (train_nado + finetune: the joint stage writes both records, the NADO's
holding the joint training) and the training steps' own seconds (`step_seconds` of the
metrics, compiles excluded), for `parallel_colocated` and `parallel_joint`.

    python -m benchmarks.schemes_bench --only parallel_colocated parallel_joint --iterations 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._results import load_avg, machine_info, write_results

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (loop overrides, processes)
    "sequential_colocated": ({"scheme": "sequential"}, None),
    "parallel_colocated": ({"scheme": "parallel"}, None),
    "parallel_split": (
        {"scheme": "parallel", "placement": "split", "roles": {"sampler": 4, "nado": 2, "lm": 2}},
        None,
    ),  # fmt: skip
    "parallel_jobs": ({"scheme": "parallel", "placement": "jobs", "poll_seconds": 0.1}, 2),
    "parallel_joint": ({"scheme": "parallel", "placement": "joint"}, None),
}
TRAINING = ("train_nado", "finetune", "joint")  # the stages (metrics names) that train


def training_seconds(records: list[dict], metrics: list[dict]) -> dict[str, Any]:
    """Per iteration from 2 on (the parallel scheme's joint iterations): the training stages'
    record seconds and their steps' seconds (compiles excluded), and their means."""
    out: dict[str, dict[int, float]] = {"records_s": {}, "steps_s": {}}
    for r in records:
        if r["stage"] in TRAINING and r["iteration"] >= 2 and r.get("seconds") is not None:
            i = r["iteration"]
            out["records_s"][i] = out["records_s"].get(i, 0.0) + float(r["seconds"])
    for m in metrics:
        if m.get("stage") in TRAINING and m.get("iteration", 0) >= 2 and "step_seconds" in m:
            i = m["iteration"]
            out["steps_s"][i] = out["steps_s"].get(i, 0.0) + float(m["step_seconds"])
    return {
        **{k: {i: round(v, 3) for i, v in sorted(d.items())} for k, d in out.items()},
        **{f"mean_{k}": round(sum(d.values()) / len(d), 3) if d else None for k, d in out.items()},
    }


def _config(model_dir: Path, iterations: int, loop: dict[str, Any]) -> dict[str, Any]:
    from tests._tiny_run import tiny_config

    return tiny_config(
        model_dir,
        prompts={"block_size": 16},
        loop={"iterations": iterations, "checkpoint_every": 100, **loop},
        train_nado={"epochs": 3},
        finetune={"epochs": 3},
        eval={"enabled": False},
    )


def _env(devices: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


def run_variant(name: str, root: Path, model_dir: Path, iterations: int) -> dict[str, Any]:
    """Run one variant into `root/name`; its figures from the manifest."""
    from benchmarks import schedule
    from jaxdetox.evaluate.runs import iteration_walls, steady_iteration_time
    from jaxdetox.pipeline.rundir import RunDir, read_manifest
    from tests._tiny_run import write_config

    loop, per_role_devices = VARIANTS[name]
    config = write_config(root / f"{name}.yaml", _config(model_dir, iterations, loop))
    out = root / name
    cmd = [sys.executable, "-m", "jaxdetox.cli", "run", str(config), "--out", str(out),
           "--no-progress"]  # fmt: skip
    start = time.perf_counter()
    if per_role_devices is None:
        procs = [subprocess.Popen(cmd, env=_env(8), stdout=subprocess.DEVNULL)]
    else:
        procs = [
            subprocess.Popen(
                [*cmd, "--role", r], env=_env(per_role_devices), stdout=subprocess.DEVNULL
            )  # fmt: skip
            for r in ("sampler", "nado", "lm")
        ]
    if any(p.wait() for p in procs):
        raise RuntimeError(f"{name}: a run process failed")
    records = read_manifest(out)
    steady = steady_iteration_time(iteration_walls(records))
    handover = max((r["outputs"].get("handover_seconds", 0.0) for r in records), default=0.0)
    modelled = schedule.schedule(records, handover_s=handover)
    return {
        "run_seconds": round(time.perf_counter() - start, 1),
        "steady": {k: round(v, 3) for k, v in steady.items()},
        "wall_over_slowest": round(steady["wall"] / steady["slowest"], 3),
        "wall_over_sum": round(steady["wall"] / steady["sum"], 3),
        "modelled": {
            "steady_speedup": modelled["steady_speedup"],
            "handover_s": handover,
            "iterations": [
                {k: r[k] for k in ("iteration", "sequential_s", "parallel_s", "bottleneck")}
                for r in modelled["iterations"]
            ],
        },
        "training": training_seconds(records, RunDir(out).metrics()),
        "load_avg": load_avg(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every variant and write the JSON + a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/schemes.json")
    args = ap.parse_args(argv)
    from tests._tiny_run import save_tiny_model

    results: dict[str, Any] = {"machine": machine_info(), "iterations": args.iterations, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = save_tiny_model(root / "model")
        for name in args.only:
            results["runs"][name] = run_variant(name, root, model_dir, args.iterations)
            print(name, results["runs"][name]["steady"], flush=True)
    lines = [
        "| run | wall / iteration (s) | sum of stages (s) | slowest stage (s) | wall / slowest "
        "| modelled speedup (disjoint devices) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["runs"].items():
        s = r["steady"]
        lines.append(
            f"| {name} | {s['wall']:.2f} | {s['sum']:.2f} | {s['slowest']:.2f} "
            f"| {r['wall_over_slowest']:.2f} | {r['modelled']['steady_speedup']}× |"
        )
    runs = results["runs"]
    if "parallel_colocated" in runs and "parallel_joint" in runs:
        sep, joint = runs["parallel_colocated"]["training"], runs["parallel_joint"]["training"]
        results["joint_vs_separate"] = {
            k: round(joint[k] / sep[k], 3) if joint[k] and sep[k] else None
            for k in ("mean_records_s", "mean_steps_s")
        }
        lines += [
            "",
            "| training, iterations ≥ 2 | separate stages (s) | joint stage (s) | joint / separate |",
            "|---|---|---|---|",
            *(
                f"| {label} | {sep[k]} | {joint[k]} | {results['joint_vs_separate'][k]} |"
                for label, k in (("records", "mean_records_s"), ("steps", "mean_steps_s"))
            ),
        ]
    results["table"] = "\n".join(lines)
    print(results["table"])
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
