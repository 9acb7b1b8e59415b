"""`jaxdetox demo --out DIR`: the whole pipeline offline on the built-in default.

Evaluates the base model on the built-in held-out prompts, runs the regularised fine-tuning
loop (sample → label → train NADO → fine-tune), evaluates again, and writes

    DIR/report.md, DIR/results.json, DIR/*.png   the table (rows base, pr_sequential), plots
    DIR/model/                                    the fine-tuned LLM (HF checkpoint + tokenizer)
    DIR/nado/                                     the NADO
    DIR/run/                                      the run directory (manifest, metrics, ...)

Rerunning resumes. `--preset smoke` is a one-minute version for tests (pass `--model`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

PRESETS = ("demo", "smoke")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand."""
    p = subparsers.add_parser(
        "demo", help="the whole pipeline offline on the built-in default (minutes on CPU)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument("--preset", choices=PRESETS, default="demo")
    p.add_argument("--model", default=None, help="model path instead of the preset's")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _publish(src: Path, dst: Path) -> None:
    """`dst` gets the files of `src` (hard links where possible: no second copy on disk)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the demo and write its report."""
    from jaxdetox import assets
    from jaxdetox.commands.report import write_report
    from jaxdetox.commands.run import execute
    from jaxdetox.config import ConfigError
    from jaxdetox.loop.session import resolve_run_config

    start = time.perf_counter()
    overrides = list(args.overrides) + ([f"model.path={args.model}"] if args.model else [])
    run_dir = args.out / "run"
    try:
        config = resolve_run_config(
            str(assets.asset_path(f"{args.preset}.yaml")), run_dir, overrides
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    execute(config, run_dir, progress=not args.no_progress)
    _publish(run_dir / "final" / "model", args.out / "model")
    _publish(run_dir / "final" / "nado", args.out / "nado")
    table = write_report([run_dir], args.out)
    minutes = (time.perf_counter() - start) / 60
    print(f"\n{table}")
    print(f"demo finished in {minutes:.1f} min: {args.out / 'report.md'}, plots, "
          f"{args.out / 'model'} (HF checkpoint), {args.out / 'nado'}")  # fmt: skip
    return 0
