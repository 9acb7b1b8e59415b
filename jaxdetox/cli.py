"""`jaxdetox` command-line entry point.

Each subcommand lives in its own module under `jaxdetox/commands/` and exposes
`register(subparsers)`, which adds its argparse parser and sets `func` to a handler taking
the parsed namespace. Handlers import heavy libraries (jax, torch) lazily so `--help` is fast.

Errors: a handler raises; it does not print errors itself. `main` is the one place that turns
an error the user can act on (`jaxdetox.errors`) into one line on stderr,
`jaxdetox <command>: error: <message>`, and exit code 2; every other exception keeps its
traceback. `--debug` (any position) or `JAXDETOX_DEBUG=1` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import jaxdetox.commands
from jaxdetox.errors import debug_requested, user_error_message


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written (their examples keep their lines); every option's help ends
    with its default unless it states one itself or is an on/off switch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default == [] and action.option_strings and "default:" not in text:
            return text + " (default: none)"  # a repeatable flag given no times
        if (
            "default:" in text
            or "%(default)" in text
            or action.default is None
            or action.default is argparse.SUPPRESS
            or action.default is False
            or action.default == []
            or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("jaxdetox")
    except metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH
        import jaxdetox

        return jaxdetox.__version__


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand found in `jaxdetox.commands`."""
    parser = argparse.ArgumentParser(
        prog="jaxdetox",
        description="Attribute-controlled (NADO-regularised) fine-tuning of LLMs in JAX. "
        "`jaxdetox COMMAND --help` describes a command with an example.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"jaxdetox {_version()}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of every error (or JAXDETOX_DEBUG=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(jaxdetox.commands.__path__), key=lambda m: m.name):
        if info.name in jaxdetox.commands.HELPERS:
            continue
        module = importlib.import_module(f"jaxdetox.commands.{info.name}")
        module.register(subparsers)
    for sub in subparsers.choices.values():
        sub.formatter_class = HelpFormatter
        # SUPPRESS: a subcommand's parser must not reset a `--debug` given before it.
        sub.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the traceback of every error (or JAXDETOX_DEBUG=1)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
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
    try:
        return int(args.func(args) or 0)
    except Exception as error:
        message = None if debug_requested(args.debug) else user_error_message(error, argv)
        if message is None:
            raise
        print(f"jaxdetox {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
