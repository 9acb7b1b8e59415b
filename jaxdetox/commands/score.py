"""`jaxdetox score`: score a .jsonl or .txt of texts with any oracle, through the cache.

    jaxdetox score samples.jsonl --oracle default --out scored.jsonl
    jaxdetox score lines.txt --oracle hf:/models/toxigen_roberta --oracle-arg batch_size=16
    PERSPECTIVE_API_KEY=... jaxdetox score s.jsonl --oracle perspective --oracle-arg qps=1

Every input row is written back with `toxicity` (null where the oracle failed) and `ok`, by
default to `INPUT.scored.jsonl` next to the input (`a.txt` -> `a.txt.scored.jsonl`, so
`a.txt` and `a.jsonl` never share an output). An input with no texts is an error.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxdetox"


def add_oracle_arguments(p: argparse.ArgumentParser) -> None:
    """`--oracle NAME` and repeatable `--oracle-arg KEY=VALUE` (see `parse_oracle_args`)."""
    p.add_argument("--oracle", default="default", help="oracle name (default: %(default)s)")
    p.add_argument(
        "--oracle-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="oracle keyword argument, value parsed as YAML (repeatable)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `score` subcommand."""
    p = subparsers.add_parser(
        "score",
        help="score texts (.jsonl or .txt) with a toxicity oracle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", type=Path, help=".jsonl (one object per line) or .txt (one per line)")
    add_oracle_arguments(p)
    p.add_argument(
        "--field", default="text", help="jsonl field holding the text (default: %(default)s)"
    )
    p.add_argument(
        "--out", type=Path, help="output jsonl (default: INPUT.scored.jsonl next to the input)"
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE / "oracle_scores.sqlite",
        help="sqlite score cache (default: %(default)s)",
    )
    p.add_argument("--no-cache", action="store_true", help="score everything, cache nothing")
    p.add_argument(
        "--chunk-size", type=int, default=256, help="texts per progress step (default: %(default)s)"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="toxic if toxicity >= this (default: %(default)s)",
    )
    p.set_defaults(func=run)


def parse_oracle_args(items: list[str]) -> dict:
    """["batch_size=16", "languages=[en, de]"] -> {"batch_size": 16, "languages": ["en", "de"]}."""
    from jaxdetox.oracles import OracleArgumentError

    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OracleArgumentError(f"--oracle-arg {item!r}: expected KEY=VALUE (e.g. qps=1)")
        try:
            kwargs[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise OracleArgumentError(f"--oracle-arg {item!r}: value is not YAML ({e})") from None
    return kwargs


def read_rows(path: Path, field: str) -> list[dict]:
    """Rows of a .jsonl (each must have a string `field`) or .txt (row = {field: line})."""
    from jaxdetox.data import EmptySplitError, MalformedRecordError, MissingFieldError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise MalformedRecordError(f"{path}:{n}: invalid JSON ({err})") from None
                    if not isinstance(row, dict) or not isinstance(row.get(field), str):
                        raise MissingFieldError(f"{path}:{n}: expected a string field {field!r}")
                    rows.append(row)
            else:
                rows = [{field: line.rstrip("\r\n")} for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise MalformedRecordError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected .jsonl or .txt"
        ) from None
    if not rows:
        raise EmptySplitError(f"{path}: no texts to score (the file is empty or all blank)")
    return rows


def default_output(path: Path) -> Path:
    """`a.txt` -> `a.txt.scored.jsonl`: the whole input name, so no two inputs share one."""
    return path.with_name(path.name + ".scored.jsonl")


def run(args: argparse.Namespace) -> int:
    """Score the input file and print a summary; returns the exit code."""
    import numpy as np
    from tqdm import tqdm

    from jaxdetox import oracles
    from jaxdetox.data import DataError

    rows = read_rows(args.input, args.field)
    out = args.out or default_output(args.input)
    if out.resolve() == args.input.resolve():
        raise DataError(f"--out {out}: is the input file; scoring would overwrite it")
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
