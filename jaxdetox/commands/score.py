"""`jaxdetox score`: score a .jsonl or .txt of texts with any oracle, through the cache.

    jaxdetox score samples.jsonl --oracle default --out scored.jsonl
    jaxdetox score lines.txt --oracle hf:/models/toxigen_roberta --oracle-arg batch_size=16
    PERSPECTIVE_API_KEY=... jaxdetox score s.jsonl --oracle perspective --oracle-arg qps=1

Every input row is written back with `toxicity` (null where the oracle failed) and `ok`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxdetox"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `score` subcommand."""
    p = subparsers.add_parser(
        "score",
        help="score texts (.jsonl or .txt) with a toxicity oracle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", type=Path, help=".jsonl (one object per line) or .txt (one per line)")
    p.add_argument("--oracle", default="default", help="oracle name (default: %(default)s)")
    p.add_argument(
        "--oracle-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="oracle keyword argument, value parsed as YAML (repeatable)",
    )
    p.add_argument("--field", default="text", help="jsonl field holding the text")
    p.add_argument("--out", type=Path, help="output jsonl (default: INPUT.scored.jsonl)")
    p.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE / "oracle_scores.sqlite",
        help="sqlite score cache (default: %(default)s)",
    )
    p.add_argument("--no-cache", action="store_true", help="score everything, cache nothing")
    p.add_argument("--chunk-size", type=int, default=256, help="texts per progress step")
    p.add_argument("--threshold", type=float, default=0.5, help="toxic if toxicity >= this")
    p.set_defaults(func=run)


def parse_oracle_args(items: list[str]) -> dict:
    """["batch_size=16", "languages=[en, de]"] -> {"batch_size": 16, "languages": ["en", "de"]}."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"jaxdetox score: --oracle-arg {item!r} is not KEY=VALUE")
        kwargs[key.strip()] = yaml.safe_load(value)
    return kwargs


def read_rows(path: Path, field: str) -> list[dict]:
    """Rows of a .jsonl (each must have a string `field`) or .txt (row = {field: line})."""
    if not path.is_file():
        raise SystemExit(f"jaxdetox score: no such file {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SystemExit(f"jaxdetox score: {path}:{n}: invalid JSON ({err})") from None
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise SystemExit(
                        f"jaxdetox score: {path}:{n}: expected a string field {field!r}"
                    )
                rows.append(row)
        else:
            rows = [{field: line.rstrip("\r\n")} for line in f if line.strip()]
    return rows


def run(args: argparse.Namespace) -> int:
    """Score the input file and print a summary; returns the exit code."""
    import numpy as np
    from tqdm import tqdm

    from jaxdetox import oracles

    rows = read_rows(args.input, args.field)
    out = args.out or args.input.with_name(args.input.stem + ".scored.jsonl")
    cache = None if args.no_cache else args.cache
    oracle = oracles.load(args.oracle, cache=cache, **parse_oracle_args(args.oracle_arg))
    texts = [r[args.field] for r in rows]
    tox = np.full(len(texts), np.nan, np.float32)
    ok = np.zeros(len(texts), bool)
    start = time.perf_counter()
    with tqdm(total=len(texts), desc=f"scoring ({args.oracle})", unit="text") as bar:
        for i in range(0, len(texts), args.chunk_size):
            tox[i : i + args.chunk_size], ok[i : i + args.chunk_size] = oracle.score(
                texts[i : i + args.chunk_size]
            )
            bar.update(len(texts[i : i + args.chunk_size]))
    elapsed = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row, t, k in zip(rows, tox, ok):
            row = dict(row, toxicity=float(t) if k else None, ok=bool(k))
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = {
        "oracle_id": oracle.oracle_id,
        "texts": len(texts),
        "ok": int(ok.sum()),
        "failed": int((~ok).sum()),
        "mean_toxicity": float(tox[ok].mean()) if ok.any() else None,
        f"fraction_toxic_ge_{args.threshold}": float((tox[ok] >= args.threshold).mean())
        if ok.any()
        else None,
        "seconds": round(elapsed, 3),
        "texts_per_second": round(len(texts) / elapsed, 1) if elapsed > 0 else None,
        **oracle.stats.as_dict(),
        "output": str(out),
        "cache": str(cache) if cache else None,
    }
    print(json.dumps(summary, indent=2))
    # Partial failures are normal (they are masked and counted above); none scored is not.
    return 1 if texts and not ok.any() else 0
