"""Where every benchmark script writes its JSON (`benchmarks/results/<name>.json`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(path: str | Path, results: Any, *, indent: int = 2) -> Path:
    """Write `results` as JSON to `path` (parents created) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=indent) + "\n")
    print("wrote", path)
    return path
