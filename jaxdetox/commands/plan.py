"""`jaxdetox plan CONFIG.yaml [key=value ...] [--device-kind KIND] [--num-devices N]`: the
memory per device of every stage of a run, and the mesh shapes that fit a device kind.

    jaxdetox plan experiments/llama2-7b/pr_sequential.yaml --device-kind h100-80gb --num-devices 8
    jaxdetox plan experiments/tiny/pr_sequential.yaml model.path=/ckpt/Llama-2-13b-hf \\
        model.dtype=bfloat16 mesh.data=1 mesh.fsdp=-1 --device-kind v5p --num-devices 64

Nothing is loaded or computed on devices: the model's architecture comes from its config
file (a hub id fetches only config.json), every tree is abstract (`jax.eval_shape`), and
shards follow the logical-axis rules on the planned mesh shape. Rows: the trained model's
parameters, optimizer state and float32 gradients, the reference LLM, the NADO, the batch,
the activations kept for the backward pass (traced with the configured remat policy), the
layer being recomputed / differentiated, the teacher's hidden states, the KL chunk, and the
artefacts the run holds between stages. `jaxdetox run CONFIG --dry-run` prints the same
table for the configured mesh.

Device kinds: a100-40gb, a100-80gb, h100-80gb, h200-141gb, l4-24gb, v4, v5e, v5p, v6e.
"""

from __future__ import annotations

import argparse
import math


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `plan` subcommand."""
    p = subparsers.add_parser(
        "plan",
        help="memory per device of a run's stages; mesh shapes that fit a device kind",
        description=__doc__,
    )
    p.add_argument("config", help="CONFIG.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    p.add_argument("--device-kind", help="accelerator to fit (default: this machine's, if known)")
    p.add_argument(
        "--num-devices", type=int, help="devices to plan for (default: the mesh's, else local)"
    )
    p.add_argument("--top", type=int, default=6, help="mesh shapes to suggest")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the plan of the configured mesh, then the suggested mesh shapes."""
    from jaxdetox.config import ConfigError, check_method, load_config
    from jaxdetox.planning import memory
    from jaxdetox.planning.plan import mesh_sizes, plan, planner

    config = load_config(args.config, args.overrides)
    check_method(config)
    if args.num_devices is not None and args.num_devices < 1:
        raise ConfigError(f"--num-devices: expected a count >= 1, got {args.num_devices}")
    if args.top < 1:
        raise ConfigError(f"--top: expected a count >= 1, got {args.top}")
    try:
        kind = memory.device_kind(args.device_kind) if args.device_kind else None
    except ValueError as e:
        raise ConfigError(f"--device-kind: {e}") from None
    kind = kind or memory.local_device_kind()
    sizes = mesh_sizes(config, args.num_devices)
    n = args.num_devices or math.prod(sizes.values())
    print(plan(config, n, kind.name if kind else None))
    if math.prod(sizes.values()) != n:
        print(f"(the configured mesh has {math.prod(sizes.values())} devices; the "
              f"suggestions below are for {n})")  # fmt: skip
    if kind is None:
        print("\n(pass --device-kind to check the fit and get mesh suggestions)")
        return 0
    variants = [planner(config)]
    labels = [f"remat {'on' if config.model.remat else 'off'} (as configured)"]
    if not config.model.remat:
        remat = config.model.model_copy(update={"remat": True, "remat_policy": "full"})
        variants.append(planner(config.model_copy(update={"model": remat})))
        labels.append("remat on")
    rows = memory.suggest(variants, n, kind, top=args.top)
    print(f"\nmesh shapes for {n} x {kind.name} ({kind.budget / 2**30:.1f} GiB usable each): "
          "peak GiB per device, its stage, ok = fits")  # fmt: skip
    print(memory.format_suggestions(rows, labels, kind))
    return 0
