"""Built-in package data for the offline demo (how each file was made: docs/assets.md).

- `prompts.jsonl`: sentence beginnings, one JSON object per line with `id`, `text`,
  `split` ("train" | "eval", disjoint) and `kind` ("toxic": written to invite an insult,
  rant or profanity as the continuation; "neutral": everyday beginnings).
- `heldout.txt`: a few KB of clean, benign prose for perplexity.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

SPLITS = ("train", "eval")
KINDS = ("toxic", "neutral")


def asset_path(name: str) -> Path:
    """Filesystem path of the built-in asset `name` (e.g. "prompts.jsonl")."""
    path = Path(str(importlib.resources.files(__name__) / name))
    if not path.is_file():
        raise FileNotFoundError(f"built-in asset {name!r} not found at {path}")
    return path


def load_prompts(split: str | None = None, kind: str | None = None) -> list[dict]:
    """Built-in prompts as dicts (id, text, split, kind), filtered by `split` and `kind`."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    with asset_path("prompts.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        r
        for r in rows
        if (split is None or r["split"] == split) and (kind is None or r["kind"] == kind)
    ]


def heldout_text() -> str:
    """The built-in clean held-out prose (for perplexity), as one string."""
    return asset_path("heldout.txt").read_text(encoding="utf-8")
