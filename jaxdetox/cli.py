"""`jaxdetox` command-line entry point.

Each subcommand lives in its own module under `jaxdetox/commands/` and exposes
`register(subparsers)`, which adds its argparse parser and sets `func` to a handler taking
the parsed namespace. Handlers import heavy libraries (jax, torch) lazily so `--help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import jaxdetox.commands


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand found in `jaxdetox.commands`."""
    parser = argparse.ArgumentParser(
        prog="jaxdetox",
        description="Attribute-controlled (NADO-regularised) fine-tuning of LLMs in JAX.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(jaxdetox.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"jaxdetox.commands.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; returns the process exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positionals after an option (`run C.yaml --dry-run a=1`): a
    # subcommand that collects `key=value` overrides gets the leftovers that look like one.
    overrides = getattr(args, "overrides", None)
    if extra and overrides is not None and all("=" in x and not x.startswith("-") for x in extra):
        overrides.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
