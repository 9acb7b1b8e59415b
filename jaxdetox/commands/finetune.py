"""`jaxdetox finetune RUN_DIR --iteration I`: stage 4 of one iteration on a run directory.

Fine-tunes LLM_I from LLM_(I-1) with the teacher reference ⊕ NADO_I on S_I (and the corpus,
if the run has one), using the run's saved config; records the stage and writes its
checkpoint. Rerunning resumes from the last checkpoint; a finished stage is skipped.

    jaxdetox finetune runs/tiny --iteration 1      # after train-nado of iteration 1
"""

from __future__ import annotations

import argparse

from jaxdetox.commands.stage_command import register_stage, run_one_stage


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `finetune` subcommand."""
    register_stage(subparsers, "finetune", __doc__, run)


def run(args: argparse.Namespace) -> int:
    """Fine-tune LLM_I."""
    from jaxdetox.pipeline.finetune import finetune

    i, why = args.iteration, f"finetune of iteration {args.iteration}"
    needs = [(i, "train_nado", f"{why} (NADO_{i})"), (i - 1, "finetune", f"{why} (LLM_{i - 1})")]
    body = lambda exp: finetune(exp, i, lm_version=i - 1, nado_version=i, samples=i)  # noqa: E731
    return run_one_stage(args, "finetune", needs, body, f"LLM_{i}")
