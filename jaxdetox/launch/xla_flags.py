"""The recommended XLA flags and environment for GPU training, kept in this one place.

    eval "$(python3 -m jaxdetox.launch.xla_flags gpu)"   # what gpu_scripts/launch.sh does

prints `export` lines: `XLA_FLAGS` with the recommended flags added to whatever the caller
already set (a flag the caller set keeps the caller's value) and the environment defaults
below unless already set. Every flag name is checked against the installed jaxlib by
tests/test_launch_scripts.py (XLA aborts at start-up on an unknown flag).

Why these (JAX "GPU performance tips" and NVIDIA JAX-Toolbox "GPU performance" pages):
the latency-hiding scheduler overlaps collectives with compute; the FSDP all-gathers and
reduce-scatters of the scanned layers are pipelined across loop iterations (the next
layer's weights arrive while this one computes) and the loop is double-buffered for it;
combining small collectives up to 128 MiB makes fewer, larger NCCL calls.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping

_COMBINE = str(128 * 2**20)

XLA_FLAGS: dict[str, dict[str, str]] = {
    "gpu": {
        "xla_gpu_enable_latency_hiding_scheduler": "true",
        "xla_gpu_enable_pipelined_all_gather": "true",
        "xla_gpu_enable_pipelined_reduce_scatter": "true",
        "xla_gpu_enable_pipelined_all_reduce": "true",
        "xla_gpu_enable_while_loop_double_buffering": "true",
        "xla_gpu_all_gather_combine_threshold_bytes": _COMBINE,
        "xla_gpu_reduce_scatter_combine_threshold_bytes": _COMBINE,
        "xla_gpu_all_reduce_combine_threshold_bytes": _COMBINE,
    },
    # TPU runtimes ship tuned defaults; nothing is added there.
    "tpu": {},
    "cpu": {},
}

ENVIRONMENT: dict[str, dict[str, str]] = {
    # JAX preallocates 75% of GPU memory by default; training wants most of it (the planner's
    # "fits" budget assumes this fraction).
    "gpu": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"},
    "tpu": {},
    "cpu": {},
}


def _names(flags: str) -> set[str]:
    return {f.split("=", 1)[0].lstrip("-") for f in flags.split()}


def merge_xla_flags(existing: str, recommended: Mapping[str, str]) -> str:
    """`existing` XLA_FLAGS plus each recommended `--name=value` whose name it does not set."""
    have = _names(existing)
    added = [f"--{name}={value}" for name, value in recommended.items() if name not in have]
    return " ".join([existing.strip(), *added]).strip()


def environment(platform: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables to set for `platform` (gpu, tpu, cpu) given the current environment."""
    if platform not in XLA_FLAGS:
        raise ValueError(f"platform {platform!r}; expected one of {sorted(XLA_FLAGS)}")
    environ = os.environ if environ is None else environ
    out = {k: v for k, v in ENVIRONMENT[platform].items() if k not in environ}
    flags = merge_xla_flags(environ.get("XLA_FLAGS", ""), XLA_FLAGS[platform])
    if flags:
        out["XLA_FLAGS"] = flags
    return out


def main(argv: list[str] | None = None) -> int:
    """Print `export NAME=value` lines for a shell to eval."""
    parser = argparse.ArgumentParser(prog="python -m jaxdetox.launch.xla_flags")
    parser.add_argument("platform", choices=sorted(XLA_FLAGS))
    args = parser.parse_args(argv)
    for name, value in environment(args.platform).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
