"""Multi-host start-up from the command line: the flags and `jax.distributed.initialize`.

Kept apart from `jaxdetox.commands.session` so that registering the flags imports no jax (the
CLI's `--help` and its input errors stay fast).
"""

from __future__ import annotations

import argparse
import os


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """Flags for multi-host runs (each defaults to its JAX environment variable)."""
    group = parser.add_argument_group("multi-host (one process per host)")
    group.add_argument(
        "--coordinator",
        default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        help="HOST:PORT of process 0 (default: $JAX_COORDINATOR_ADDRESS, else one host)",
    )
    group.add_argument(
        "--num-processes",
        type=int,
        default=_env_int("JAX_NUM_PROCESSES"),
        help="processes in all (default: $JAX_NUM_PROCESSES)",
    )
    group.add_argument(
        "--process-id",
        type=int,
        default=_env_int("JAX_PROCESS_ID"),
        help="this process's index (default: $JAX_PROCESS_ID)",
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def init_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` when a coordinator is given (or on a TPU pod, where JAX
    discovers the hosts by itself when `JAXDETOX_DISTRIBUTED=1`)."""
    import jax

    if args.coordinator:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    elif os.environ.get("JAXDETOX_DISTRIBUTED") == "1":
        jax.distributed.initialize()
