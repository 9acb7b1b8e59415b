"""Run a script as several real JAX processes (multi-host tests on one machine)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_jax_processes(
    script: str, tmp_path: Path, args: list[str], *, num: int = 2, timeout: int = 300
) -> list[Any]:
    """Run `script` as `num` processes with argv `[process_id, port, out_json, *args]`.

    The script calls `jax.distributed.initialize("127.0.0.1:<port>", num, process_id)` and
    writes its result as JSON to `out_json`; each process must exit 0. Returns the results.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "host.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    repo = str(Path(__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    outs = [tmp_path / f"h{i}.json" for i in range(num)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(path), str(i), str(port), str(outs[i]), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(num)
    ]
    for p in procs:
        log = p.communicate(timeout=timeout)[0].decode()
        assert p.returncode == 0, log[-3000:]
    return [json.loads(out.read_text()) for out in outs]
