"""`jaxdetox run CONFIG.yaml --out RUN_DIR [key=value ...]`: run an experiment.

    jaxdetox run experiments/tiny/pr_sequential.yaml --out runs/tiny
    jaxdetox run experiments/tiny/pr_sequential.yaml --out runs/tiny finetune.kl_weight=0.5
    jaxdetox run experiments/tiny/pr_sequential.yaml --dry-run     # check + plan only
    jaxdetox run CONFIG --out gs://bucket/run --role lm    # one role (loop.placement=jobs)
    jaxdetox run experiments/tiny/dpo.yaml --out runs/tiny_dpo       # a baseline

`method:` picks what runs: a method of the registry (`jaxdetox.methods`, docs/baselines.md),
the method (pr_sequential, pr_parallel and its named variants, which run the scheme of
`loop.scheme` under their own row name), a baseline, or lambda_sweep (pr_sequential per λ in
RUN/lambda_<λ>/). Any other name is an error when the config loads. Every method runs
through the same executor, so `loop.placement` (colocated, split, jobs), resuming and a
gs:// `--out` work the same for all of them.

Before anything is written, the run checks what it would fail on: the model (file format,
weights, tokenizer), the mesh against the devices here, the prompts and corpus, every
oracle (arguments, packages, credentials) and `--out` (new, or a run directory of this
project whose saved config matches; another folder needs `--overwrite`). `--dry-run` makes
the same checks and prints the plan. To plan a run for other hardware on a machine without
its data and weights, use `jaxdetox plan`.

Rerunning the same command resumes the run where it stopped: finished stages are skipped,
sampling and labelling continue from their committed chunks, training from its last
checkpoint. The run directory keeps the resolved config, `manifest.json`, `metrics.jsonl`,
TensorBoard events and the final models in `final/`.
"""

from __future__ import annotations

import argparse

from jaxdetox.config import ROLES
from jaxdetox.fileio import as_path
from jaxdetox.launch.distributed import add_distributed_args

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `run` subcommand."""
    p = subparsers.add_parser(
        "run",
        help="run an experiment from a YAML config (rerun = resume)",
        description=__doc__,
    )
    p.add_argument("config", nargs="?", help="CONFIG.yaml (omit to resume RUN_DIR as saved)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    p.add_argument(
        "--out",
        type=as_path,
        help="run directory, local or gs://... (required unless --dry-run; default: none)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything the run would fail on (model, mesh, prompts, corpus, oracles, "
        "--out), print the plan and the memory per device; run nothing",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="accept an --out folder that exists and is not a jaxdetox run directory",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--role",
        choices=ROLES,
        help="loop.placement=jobs: run this role only (start one program per role on the same "
        "--out; each waits for the others' outputs; default: every role)",
    )
    add_distributed_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check, then plan (`--dry-run`) or execute the run."""
    from jaxdetox.commands.session import resolve_run_config
    from jaxdetox.config import ConfigError, load_config
    from jaxdetox.launch.distributed import init_distributed
    from jaxdetox.pipeline.rundir import check_out
    from jaxdetox.planning.preflight import check_run

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path and not config_path.endswith(".yaml"):
        config_path, overrides = None, [config_path, *overrides]
    if args.dry_run:
        if config_path is None and args.out is not None:
            check_out(args.out, overwrite=args.overwrite)
            config = resolve_run_config(None, args.out, overrides)
        else:
            config = load_config(config_path, overrides)
        notes = check_run(config, args.out, overwrite=args.overwrite, role=args.role)
        from jaxdetox.methods import method_of
        from jaxdetox.pipeline.flow import describe_flow
        from jaxdetox.planning.plan import plan

        print(plan(config))
        print()
        print(describe_flow(config, method_of(config.method).plan(config)))
        print("\nchecked (a run would start):\n  " + "\n  ".join(notes))
        return 0
    if args.out is None:
        raise ConfigError("--out RUN_DIR is required (or --dry-run to check and plan only)")
    init_distributed(args)
    check_out(args.out, overwrite=args.overwrite)
    config = resolve_run_config(config_path, args.out, overrides)
    placement = config.loop.placement
    if (placement == "jobs") != (args.role is not None):
        raise ConfigError(
            f"loop.placement is {placement!r}: "
            + (
                "start each role with --role sampler|nado|lm (one program per role)"
                if args.role is None
                else "--role is only for loop.placement=jobs"
            )
        )
    check_run(config, role=args.role)  # before anything is written into --out
    from jaxdetox.commands.session import execute

    return execute(config, args.out, progress=not args.no_progress, role=args.role)
