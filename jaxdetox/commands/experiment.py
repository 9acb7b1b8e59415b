"""`jaxdetox experiment DIR [--out OUT]`: every config of a folder, then one report.

    jaxdetox experiment experiments/tiny                  # runs in runs/tiny/<config name>/
    jaxdetox experiment experiments/gpt2 --out runs/gpt2  # same, elsewhere
    jaxdetox experiment experiments/tiny --only base,dpo  # a subset (by file stem)
    jaxdetox experiment experiments/tiny --dry-run        # check every config, run nothing

Runs each `DIR/*.yaml` (sorted; `base.yaml` first so every table has its base row) in
`OUT/<file stem>/` with `jaxdetox run`'s code: a run whose manifest shows it finished is
skipped, an unfinished one resumes. Then writes `OUT/report.md`, `OUT/results.json` and the
plots over all of them (`jaxdetox report`). Overrides (`key=value`) apply to every config.
Every config is checked before the first one runs (what `jaxdetox run --dry-run` checks);
`--dry-run` stops there and prints one line per config.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxdetox.fileio import as_path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `experiment` subcommand."""
    p = subparsers.add_parser(
        "experiment",
        help="run every config in a folder (resumable) and report them together",
        description=__doc__,
    )
    p.add_argument("dir", type=Path, help="folder of run configs (*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every config")
    p.add_argument(
        "--out", type=as_path, default=None, help="local or gs://...; default: runs/<folder name>"
    )
    p.add_argument(
        "--only", default=None, help="comma-separated config stems to run (default: all)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="check every config and print its plan line only"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="accept an --out folder that exists and is not a jaxdetox output folder",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def configs_of(directory: Path, only: str | None = None) -> list[Path]:
    """The folder's configs in run order: `base.yaml` first, then by name."""
    from jaxdetox.config import ConfigError

    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a folder of configs")
    paths = sorted(directory.glob("*.yaml"), key=lambda p: (p.stem != "base", p.stem))
    if only:
        wanted = {s.strip() for s in only.split(",") if s.strip()}
        missing = wanted - {p.stem for p in paths}
        if missing:
            raise ConfigError(
                f"--only: {directory} has no config named {', '.join(sorted(missing))}"
            )
        paths = [p for p in paths if p.stem in wanted]
    if not paths:
        raise ConfigError(f"{directory}: no *.yaml configs")
    return paths


def run(args: argparse.Namespace) -> int:
    """Run (or skip, or resume) every config, then write the combined report."""
    from jaxdetox.commands.report import write_report
    from jaxdetox.commands.session import execute, resolve_run_config
    from jaxdetox.methods import is_finished
    from jaxdetox.pipeline.rundir import check_out
    from jaxdetox.planning.preflight import check_run

    out = args.out or as_path(Path("runs") / args.dir.name)
    check_out(out, overwrite=args.overwrite, nested=True)
    plans = []
    for path in configs_of(args.dir, args.only):
        config = resolve_run_config(str(path), out / path.stem, list(args.overrides))
        check_run(config, out / path.stem, overwrite=args.overwrite)
        plans.append((path, config, out / path.stem))
    if args.dry_run:
        for path, config, run_dir in plans:
            state = "finished, skipped" if is_finished(config, run_dir) else "would run"
            print(f"{path.name}: ok ({config.method}, {config.loop.iterations} iterations) "
                  f"-> {run_dir}: {state}")  # fmt: skip
        return 0
    for path, config, run_dir in plans:
        if is_finished(config, run_dir):
            print(f"{path.name}: finished earlier ({run_dir}), skipped")
            continue
        print(f"{path.name}: running {config.method} in {run_dir}")
        execute(config, run_dir, progress=not args.no_progress)
    table = write_report([run_dir for _, _, run_dir in plans], out)
    print(f"\n{table}")
    print(f"wrote {out / 'report.md'}, {out / 'results.json'} and plots in {out}")
    return 0
