"""`jaxdetox train-nado RUN_DIR --iteration I`: stage 3 of one iteration on a run directory.

Trains NADO_I from NADO_(I-1) on the labelled samples S_I already in the run's sample store
(the run's saved config gives every setting), records the stage in the manifest and writes
its checkpoint. Rerunning resumes from the last checkpoint; a finished stage is skipped.

    jaxdetox train-nado runs/tiny --iteration 1    # after sample and label of iteration 1
"""

from __future__ import annotations

import argparse

from jaxdetox.commands.stage_command import register_stage, run_one_stage


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train-nado` subcommand."""
    register_stage(subparsers, "train-nado", __doc__, run)


def run(args: argparse.Namespace) -> int:
    """Train NADO_I on S_I."""
    from jaxdetox.pipeline.train_nado import train_nado

    i, why = args.iteration, f"train_nado of iteration {args.iteration}"
    needs = [(i, "label", why), (i - 1, "train_nado", f"{why} (NADO_{i - 1})")]
    body = lambda exp: train_nado(exp, i, nado_version=i - 1, samples=i)  # noqa: E731
    return run_one_stage(args, "train_nado", needs, body, f"NADO_{i}")
