"""`jaxdetox experiment DIR [--out OUT]`: every config of a folder, then one report.

    jaxdetox experiment experiments/tiny                  # runs in runs/tiny/<config name>/
    jaxdetox experiment experiments/gpt2 --out runs/gpt2  # same, elsewhere
    jaxdetox experiment experiments/tiny --only base,dpo  # a subset (by file stem)

Runs each `DIR/*.yaml` (sorted; `base.yaml` first so every table has its base row) in
`OUT/<file stem>/` with `jaxdetox run`'s code: a run whose manifest shows it finished is
skipped, an unfinished one resumes. Then writes `OUT/report.md`, `OUT/results.json` and the
plots over all of them (`jaxdetox report`). Overrides (`key=value`) apply to every config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxdetox.fileio import as_path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `experiment` subcommand."""
    p = subparsers.add_parser(
        "experiment", help="run every config in a folder (resumable) and report them together",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("dir", type=Path, help="folder of run configs (*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every config")
    p.add_argument(
        "--out", type=as_path, default=None, help="local or gs://...; default: runs/<folder name>"
    )
    p.add_argument("--only", default=None, help="comma-separated config stems to run")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def configs_of(directory: Path, only: str | None = None) -> list[Path]:
    """The folder's configs in run order: `base.yaml` first, then by name."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a folder of configs")
    paths = sorted(directory.glob("*.yaml"), key=lambda p: (p.stem != "base", p.stem))
    if only:
        wanted = {s.strip() for s in only.split(",") if s.strip()}
        missing = wanted - {p.stem for p in paths}
        if missing:
            raise FileNotFoundError(f"{directory}: no config named {', '.join(sorted(missing))}")
        paths = [p for p in paths if p.stem in wanted]
    if not paths:
        raise FileNotFoundError(f"{directory}: no *.yaml configs")
    return paths


def run(args: argparse.Namespace) -> int:
    """Run (or skip, or resume) every config, then write the combined report."""
    from jaxdetox.commands.report import write_report
    from jaxdetox.commands.run import check_method, execute
    from jaxdetox.config import ConfigError
    from jaxdetox.loop.baselines import is_finished
    from jaxdetox.loop.session import resolve_run_config

    out = args.out or as_path(Path("runs") / args.dir.name)
    try:
        plans = []
        for path in configs_of(args.dir, args.only):
            config = resolve_run_config(str(path), out / path.stem, list(args.overrides))
            check_method(config)
            plans.append((path, config, out / path.stem))
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
