"""Shared benchmark plumbing: JSON output, machine description, alternating timed repetitions."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_results(path: str | Path, results: Any, *, indent: int = 2) -> Path:
    """Write `results` as JSON to `path` (parents created) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=indent) + "\n")
    print("wrote", path)
    return path


def load_avg() -> float:
    """The 1-minute load average (other processes sharing the cores)."""
    return round(os.getloadavg()[0], 2)


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of `fn`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(runs: dict[str, Callable[[], Any]], reps: int) -> dict[str, Any]:
    """Time every function of `runs` once per repetition, in turn (so machine noise hits all
    sides alike), after one warm-up call each. Returns `{"s": {name: [seconds]},
    "median_s": {name: median}, "load_avg": [per repetition]}`."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    loads = []
    for _ in range(reps):
        loads.append(load_avg())
        for name, fn in runs.items():
            times[name].append(timed(fn))
    return {
        "s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "median_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "load_avg": loads,
    }


def machine_info() -> dict[str, Any]:
    """Host, CPU count, load, library versions and the default JAX device."""
    import jax

    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    for name in ("torch", "transformers", "flax", "optax"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["torch_cuda"] = torch.cuda.is_available()
    except ImportError:
        pass
    return info
