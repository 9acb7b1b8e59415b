"""`jaxdetox train-nado RUN_DIR --iteration I`: stage 3 of one iteration on a run directory.

Trains NADO_I from NADO_(I-1) on the labelled samples S_I already in the run's sample store
(the run's saved config gives every setting), records the stage in the manifest and writes
its checkpoint. Rerunning resumes from the last checkpoint; a finished stage is skipped.
"""

from __future__ import annotations

import argparse
import sys

from jaxdetox.loop.stage_command import open_experiment, register_stage


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train-nado` subcommand."""
    register_stage(subparsers, "train-nado", __doc__, run)


def run(args: argparse.Namespace) -> int:
    """Train NADO_I on S_I."""
    from jaxdetox.config import ConfigError
    from jaxdetox.loop.sequential import train_nado
    from jaxdetox.loop.session import require_done

    exp, run_dir = open_experiment(args)
    i = args.iteration
    try:
        require_done(run_dir, i, "label", f"train_nado of iteration {i}")
        require_done(run_dir, i - 1, "train_nado", f"train_nado of iteration {i} (NADO_{i - 1})")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train_nado(exp, i, nado_version=i - 1, samples=i)
    run_dir.close()
    print(f"NADO_{i}: {run_dir.record(i, 'train_nado')['outputs']}")
    return 0
