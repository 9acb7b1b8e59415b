"""`jaxdetox run` as its own process (a role of the `jobs` placement, a run to kill)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_run(config: Path, out: Path, *extra: str, devices: int = 2) -> subprocess.Popen:
    """`jaxdetox run CONFIG --out OUT --no-progress EXTRA...` on `devices` fake CPU devices."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "jaxdetox.cli", "run", str(config), "--out", str(out),
         "--no-progress", *extra],
        cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    """Wait for the process; its output (it must have exited 0)."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out
