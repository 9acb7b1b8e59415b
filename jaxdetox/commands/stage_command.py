"""Shared body of the one-stage commands (`jaxdetox train-nado`, `jaxdetox finetune`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from jaxdetox.fileio import as_path


def register_stage(
    subparsers: argparse._SubParsersAction, name: str, doc: str, func: Callable[..., int]
) -> None:
    """Add a subcommand `name RUN_DIR --iteration I [key=value ...]` handled by `func`."""
    from jaxdetox.launch.distributed import add_distributed_args

    summary = doc.splitlines()[0].split("`: ", 1)[-1]  # the line after its usage
    p = subparsers.add_parser(name, help=summary, description=doc)
    p.add_argument("out", type=as_path, help="run directory (made by `jaxdetox run`)")
    p.add_argument("--iteration", type=int, required=True, help="iteration (1-based)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="must match the run's")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_distributed_args(p)
    p.set_defaults(func=func)


def open_experiment(args: argparse.Namespace) -> tuple[Any, Any]:
    """`(experiment, run dir)` for an existing run directory (`ConfigError` if it is not one,
    or the overrides change its config)."""
    from jaxdetox.commands.session import open_run, resolve_run_config, setup_logging
    from jaxdetox.config import ConfigError
    from jaxdetox.launch.distributed import init_distributed
    from jaxdetox.pipeline.experiment import Experiment

    if args.iteration < 1:
        raise ConfigError(f"--iteration must be >= 1, got {args.iteration}")
    init_distributed(args)
    config = resolve_run_config(None, args.out, list(args.overrides))
    setup_logging()
    run = open_run(config, args.out)
    return Experiment(config, run, progress=not args.no_progress), run


def run_one_stage(
    args: argparse.Namespace,
    stage: str,
    needs: list[tuple[int, str, str]],
    body: Callable[[Any], None],
    artefact: str,
) -> int:
    """Open the run, check that every `(iteration, stage, why)` in `needs` is done, run
    `body(experiment)`, and print the stage's outputs (`ConfigError` naming what is missing)."""
    from jaxdetox.commands.session import require_done

    exp, run_dir = open_experiment(args)
    for iteration, needed, why in needs:
        require_done(run_dir, iteration, needed, why)
    body(exp)
    run_dir.close()
    print(f"{artefact}: {run_dir.record(args.iteration, stage)['outputs']}")
    return 0
