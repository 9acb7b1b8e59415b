"""`joint_step` vs the authors'-form PyTorch update: time per step and peak memory.

    python -m benchmarks.joint_vs_torch [--reps 3] [--batch 8 --length 128] [--out FILE]

Each side lives in its own worker process (`--worker ours|torch`), so each one's peak
memory is its own: on CPU the peak resident set over the timed steps (`VmHWM`, restarted
after the warm-up step with freed heap pages returned to the OS) minus the resident set
after the imports (the libraries' own pages are not the step's memory); the peak over
build + compile + warm-up is reported beside it; on a
GPU `peak_bytes_in_use` of the JAX device / `torch.cuda.max_memory_allocated`. The parent
asks the two workers for one step each in turn (alternating, after a warm-up step; compile
and build time reported apart), so the time ratio is a same-run, same-load figure.

Same shapes and model sizes on both sides: GPT-2 small student (+ frozen reference copy),
a separate NADO of 2 GPT-2 layers + `Linear(768, V)` with bias, fp32, B×T samples with a
0/1 label each; λ = α = 1; AdamW with global-norm clip 1.0 on both the LLM and the NADO.
Ours: `joint_step` (fused chunked KL + NLL, NADO BCE on gathered rows); PyTorch:
`torch_baseline.TorchRegularizedStep(train_nado=True)` (full `[B, T, V]` logits).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._batches import GPT2_SMALL, LR, NADO_LAYERS, make_stream, with_labels

TAG = "@@ "  # protocol lines on a worker's stdout (anything else it prints is passed through)


def _status_bytes(field: str) -> int | None:
    """`VmRSS` / `VmHWM` of this process from /proc/self/status (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _release_and_reset_peak() -> bool:
    """Return freed heap pages to the OS (so the resident set is live memory), then restart
    the kernel's peak-RSS counter (VmHWM) from the current RSS. False where unsupported.

    `ru_maxrss` cannot serve here: a child starts with the peak of the parent it was
    forked from."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _send(obj: dict) -> None:
    print(TAG + json.dumps(obj), flush=True)


def _ours_step(batch: int, length: int) -> tuple[Any, dict, Any]:
    """Our joint step on random GPT-2-small weights: (step fn, info, device-peak fn)."""
    import jax

    from benchmarks._jax_steps import Ours
    from jaxdetox import sharding
    from jaxdetox.lm import random_init
    from jaxdetox.models import ModelConfig, NadoConfig, init_nado
    from jaxdetox.train import OptimizerConfig, joint_step, make_training

    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    config = ModelConfig.from_hf({**GPT2_SMALL, "tie_word_embeddings": True})
    lm = random_init(config, 0, mesh=mesh)
    nado_config = NadoConfig.for_lm(config, "separate", num_layers=NADO_LAYERS, head_init="normal")
    nado = init_nado(nado_config, 1, lm_model=lm.model, mesh=mesh)
    opt = OptimizerConfig(learning_rate=LR)
    tr = make_training(lm.model, nado, mesh, lm_optimizer=opt, nado_optimizer=opt)
    del lm, nado
    rng = np.random.default_rng(0)
    samples = {"samples": with_labels(make_stream(rng, batch, length, config.vocab_size), rng)}
    ours = Ours(tr, mesh)
    ours.runner("joint", joint_step)
    compile_s, _ = ours.compile("joint", samples)
    n_params = sum(x.size for x in jax.tree.leaves(ours.state.lm.params))
    n_nado = sum(x.size for x in jax.tree.leaves(ours.state.nado.params))
    mem = ours.compiled("joint", samples).memory_analysis()  # cached executable
    info = {
        "compile_s": round(compile_s, 2),
        "lm_params": n_params,
        "nado_params": n_nado,
        # XLA's plan: the donated state (arguments, aliased by the outputs) + temporaries.
        "xla_argument_bytes": int(mem.argument_size_in_bytes),
        "xla_temp_bytes": int(mem.temp_size_in_bytes),
    }

    def device_peak() -> int | None:
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")

    return lambda: ours.step("joint", samples), info, device_peak


def _torch_step(batch: int, length: int) -> tuple[Any, dict, Any]:
    """The authors'-form PyTorch joint update: (step fn, info, device-peak fn)."""
    import torch

    from benchmarks.torch_baseline import TorchRegularizedStep, gpt2_models

    torch.set_num_threads(min(2, os.cpu_count() or 1)) if not torch.cuda.is_available() else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm, body, head = gpt2_models(nado=True)
    lm, body, head = lm.to(device), body.to(device), head.to(device)
    rng = np.random.default_rng(0)
    stream = with_labels(make_stream(rng, batch, length, GPT2_SMALL["vocab_size"]), rng)
    step = TorchRegularizedStep(lm, body, head, stream, train_nado=True)
    for name in ("ids", "targets", "mask", "labels"):
        setattr(step, name, getattr(step, name).to(device))
    n_nado = sum(p.numel() for p in step.nado_params)
    info = {"lm_params": sum(p.numel() for p in lm.parameters()), "nado_params": n_nado}

    def run() -> None:
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    def device_peak() -> int | None:
        return torch.cuda.max_memory_allocated() if device == "cuda" else None

    return run, info, device_peak


def worker(side: str, batch: int, length: int) -> None:
    """Serve steps on stdin ("step" → seconds, "stop" → peak memory) for one side."""
    if side == "ours":
        import jax  # noqa: F401  (the libraries belong to the baseline, not to the step)

        import jaxdetox.train  # noqa: F401
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    measured = _release_and_reset_peak()
    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    run, info, device_peak = (_ours_step if side == "ours" else _torch_step)(batch, length)
    info["build_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    run()  # warm-up
    info["warmup_s"] = round(time.perf_counter() - start, 3)
    build_peak = _status_bytes("VmHWM") if measured else None
    # From here on the peak is the timed steps' (live state + step memory).
    measured = measured and _release_and_reset_peak()
    _send({"ready": True, **info})
    for line in sys.stdin:
        if line.strip() == "step":
            start = time.perf_counter()
            run()
            _send({"seconds": time.perf_counter() - start})
        elif line.strip() == "stop":
            steps_peak = _status_bytes("VmHWM") if measured else None
            _send(
                {
                    "baseline_rss_bytes": baseline,
                    "build_peak_rss_bytes": build_peak,
                    "steps_peak_rss_bytes": steps_peak,
                    "steps_peak_above_baseline_bytes": (
                        None if steps_peak is None else steps_peak - baseline
                    ),
                    "device_peak_bytes": device_peak(),
                }
            )
            return


class _Worker:
    """A worker subprocess and its protocol."""

    def __init__(self, side: str, batch: int, length: int) -> None:
        cmd = [sys.executable, "-m", "benchmarks.joint_vs_torch", "--worker", side]
        cmd += ["--batch", str(batch), "--length", str(length)]
        root = Path(__file__).resolve().parents[1]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        }
        self.side = side
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root, env=env
        )

    def read(self) -> dict:
        """The next protocol message (other output is echoed)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG) :])
            print(f"[{self.side}] {line}", end="")
        raise RuntimeError(f"joint_vs_torch: the {self.side} worker exited ({self.proc.wait()})")

    def ask(self, command: str) -> dict:
        """Send one command and wait for its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()


def compare(batch: int = 8, length: int = 128, reps: int = 3) -> dict:
    """Run both workers, alternate `reps` steps, collect times and peak memories."""
    from benchmarks._results import load_avg

    # One after the other to ready (builds and compiles don't compete), then alternate.
    workers, ready = {}, {}
    for side in ("ours", "torch"):
        workers[side] = _Worker(side, batch, length)
        ready[side] = workers[side].read()
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    loads = []
    try:
        for _ in range(reps):
            loads.append(load_avg())
            for side, w in workers.items():
                times[side].append(round(w.ask("step")["seconds"], 4))
        memory = {side: w.ask("stop") for side, w in workers.items()}
    finally:
        for w in workers.values():
            w.proc.wait(timeout=120)
    med = {k: statistics.median(v) for k, v in times.items()}
    key = "device_peak_bytes"
    if not memory["ours"][key]:
        key = "steps_peak_above_baseline_bytes"
        if memory["ours"][key] is None:
            raise RuntimeError("joint_vs_torch: no /proc/self peak-RSS counter on this machine")
    return {
        "batch": batch,
        "length": length,
        "nado_layers": NADO_LAYERS,
        "reps": reps,
        "setup": ready,
        "s": times,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "load_avg": loads,
        "time_ratio_ours_over_torch": round(med["ours"] / med["torch"], 3),
        "memory": memory,
        "memory_measure": key,
        "peak_memory_ratio_ours_over_torch": round(memory["ours"][key] / memory["torch"][key], 3),
        "build_peak_ratio_ours_over_torch": (
            round(
                memory["ours"]["build_peak_rss_bytes"] / memory["torch"]["build_peak_rss_bytes"], 3
            )
            if memory["torch"]["build_peak_rss_bytes"]
            else None
        ),
    }


def main() -> None:
    """CLI: the comparison (or, with --worker, one side's worker)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=("ours", "torch"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results/joint_vs_torch.json"
    )
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.batch, args.length)
        return
    from benchmarks._results import write_results

    write_results(args.out, compare(args.batch, args.length, args.reps))


if __name__ == "__main__":
    main()
