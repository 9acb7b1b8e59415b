"""`jaxdetox demo --out DIR`: the whole pipeline offline on the built-in default.

Evaluates the base model on the built-in held-out prompts, runs the regularised fine-tuning
loop (sample → label → train NADO → fine-tune), evaluates again, and writes

    DIR/report.md, DIR/results.json, DIR/*.png   the table (rows base, pr_sequential,
                                                  nado_decoding), plots
    DIR/model/                                    the fine-tuned LLM (HF checkpoint + tokenizer)
    DIR/nado/                                     the NADO
    DIR/run/                                      the run directory (manifest, metrics, ...)
    DIR/nado_decoding/                            the nado_decoding baseline's run directory

The `nado_decoding` row samples from the frozen base model guided by the run's NADO
(α = the fine-tuning's α), on the same held-out prompts: the same target distribution reached
at decoding time instead of by fine-tuning. Its samples, labels and NADO are the method's
first iteration's (same config and seed), adopted rather than recomputed; only its guided
evaluation runs (`--no-nado-decoding` skips it).

Rerunning resumes. `--preset smoke` is a one-minute version for tests (pass `--model`).
`--dry-run` checks everything the demo would fail on (the built-in model and oracle,
`--out`) and prints its plan.

    jaxdetox demo --out runs/demo
    jaxdetox demo --out runs/demo --dry-run
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

PRESETS = ("demo", "smoke")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand."""
    p = subparsers.add_parser(
        "demo",
        help="the whole pipeline offline on the built-in default (minutes on CPU)",
        description=__doc__,
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="demo",
        help="demo: the measured 10-minute run; smoke: a one-minute one for tests",
    )
    p.add_argument(
        "--model", default=None, help="model path instead of the preset's (default: the preset's)"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument(
        "--dry-run", action="store_true", help="check and print the plan only; run nothing"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="accept an --out folder that exists and is not a jaxdetox output folder",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-nado-decoding", action="store_true", help="skip the nado_decoding row")
    p.set_defaults(func=run)


# The stages of nado_decoding's iteration 1 that are the method's by construction: samples of
# the base model on block 0, their labels, NADO_1 from NADO_0 on them.
SHARED_STAGES = ((1, "sample"), (1, "label"), (1, "train_nado"))


def _publish(src: Path, dst: Path) -> None:
    """`dst` gets the files of `src` (hard links where possible: no second copy on disk)."""
    from jaxdetox import fileio

    if dst.exists():
        shutil.rmtree(dst)
    fileio.copy_tree(src, dst, link=True)


def nado_decoding_config(config: Any) -> Any:
    """The demo's config as the `nado_decoding` baseline: one iteration, guided by NADO_1
    with the fine-tuning's α; the base model is evaluated by the method's run already."""
    from jaxdetox.config import config_from_dict

    data = config.model_dump(mode="json")
    data["method"] = "nado_decoding"
    data["loop"]["iterations"] = 1
    data["eval"]["base"] = False
    data["baseline"]["alpha"] = config.finetune.alpha
    return config_from_dict(data, "demo (nado_decoding)")


def run_nado_decoding(config: Any, run_dir: Path, out: Path, progress: bool) -> Path:
    """The nado_decoding baseline in `out`, adopting the method's shared stages from `run_dir`."""
    from jaxdetox.commands.session import execute, open_run
    from jaxdetox.pipeline.rundir import RunDir

    baseline = nado_decoding_config(config)
    ours, method = open_run(baseline, out), RunDir(run_dir)
    for iteration, stage in SHARED_STAGES:
        ours.adopt(method, iteration, stage)
    execute(baseline, out, progress=progress)
    return out


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the demo and write its report."""
    from jaxdetox import assets
    from jaxdetox.commands.report import write_report
    from jaxdetox.commands.session import execute, resolve_run_config
    from jaxdetox.pipeline.rundir import check_out
    from jaxdetox.planning.preflight import check_out_dir, check_run

    start = time.perf_counter()
    overrides = list(args.overrides) + ([f"model.path={args.model}"] if args.model else [])
    run_dir = args.out / "run"
    check_out(args.out, overwrite=args.overwrite, nested=True)
    config = resolve_run_config(str(assets.asset_path(f"{args.preset}.yaml")), run_dir, overrides)
    notes = check_run(config, run_dir, overwrite=args.overwrite)
    if not args.no_nado_decoding:
        notes.append(check_out_dir(nado_decoding_config(config), args.out / "nado_decoding"))
    if args.dry_run:
        from jaxdetox.planning.plan import plan

        print(plan(config))
        print("\nchecked (the demo would start):\n  " + "\n  ".join(notes))
        return 0
    execute(config, run_dir, progress=not args.no_progress)
    _publish(run_dir / "final" / "model", args.out / "model")
    _publish(run_dir / "final" / "nado", args.out / "nado")
    runs = [run_dir]
    if not args.no_nado_decoding:
        nado_dir = args.out / "nado_decoding"
        runs.append(run_nado_decoding(config, run_dir, nado_dir, not args.no_progress))
    table = write_report(runs, args.out)
    minutes = (time.perf_counter() - start) / 60
    print(f"\n{table}")
    print(f"demo finished in {minutes:.1f} min: {args.out / 'report.md'}, plots, "
          f"{args.out / 'model'} (HF checkpoint), {args.out / 'nado'}")  # fmt: skip
    return 0
