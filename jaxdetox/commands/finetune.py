"""`jaxdetox finetune RUN_DIR --iteration I`: stage 4 of one iteration on a run directory.

Fine-tunes LLM_I from LLM_(I-1) with the teacher reference ⊕ NADO_I on S_I (and the corpus,
if the run has one), using the run's saved config; records the stage and writes its
checkpoint. Rerunning resumes from the last checkpoint; a finished stage is skipped.
"""

from __future__ import annotations

import argparse
import sys

from jaxdetox.loop.stage_command import open_experiment, register_stage


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `finetune` subcommand."""
    register_stage(subparsers, "finetune", __doc__, run)


def run(args: argparse.Namespace) -> int:
    """Fine-tune LLM_I."""
    from jaxdetox.config import ConfigError
    from jaxdetox.loop.sequential import finetune
    from jaxdetox.loop.session import require_done

    exp, run_dir = open_experiment(args)
    i = args.iteration
    try:
        require_done(run_dir, i, "train_nado", f"finetune of iteration {i} (NADO_{i})")
        require_done(run_dir, i - 1, "finetune", f"finetune of iteration {i} (LLM_{i - 1})")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finetune(exp, i, lm_version=i - 1, nado_version=i, samples=i)
    run_dir.close()
    print(f"LLM_{i}: {run_dir.record(i, 'finetune')['outputs']}")
    return 0
