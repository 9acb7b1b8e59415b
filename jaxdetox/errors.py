"""The project's one error surface: errors a user can act on, and how the CLI shows them.

Every error class the project raises for bad input — configs (`config.ConfigError`),
checkpoints and GGUF files (`models.hf.CheckpointError`, `models.gguf.GGUFError`), model
configs (`models.config.UnsupportedConfigError`), data (`data.errors.DataError`), oracles
(`oracles.base.OracleError`), run directories (`pipeline.rundir.RunDirError`,
`pipeline.flow.VersionError`) and training checkpoints (`train.checkpoint.CheckpointError`) —
derives from `JaxdetoxError` besides its
builtin base (ValueError, RuntimeError), so callers may catch either. Its message says what
the user must know: the file or field, what was expected, what to do.

`jaxdetox.cli.main` prints such an error as one line, `jaxdetox <command>: error: <message>`,
and exits with code 2; so it does an `OSError` on a path the user named (`--out /proc/x`) or
one the project raised with a message of its own. Anything else is a programming error and
keeps its traceback; `--debug` (or `JAXDETOX_DEBUG=1`) shows the traceback of every error.
This module imports nothing heavy: the CLI uses it before jax is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

DEBUG_ENV = "JAXDETOX_DEBUG"


class JaxdetoxError(Exception):
    """Bad input the user can fix; the message names the file or field and what was expected."""


def user_paths(argv: Iterable[str]) -> set[str]:
    """Absolute forms of every path-like token of a command line (`key=value`: the value)."""
    paths = set()
    for token in argv:
        if "=" in token:
            value = token.split("=", 1)[1]  # `--out=DIR`, `model.path=DIR`
        elif token.startswith("-"):
            continue
        else:
            value = token
        if value:
            paths.add(os.path.abspath(os.path.expanduser(value)))
    return paths


def _on_user_path(filename: object, paths: set[str]) -> bool:
    """Whether `filename` is a user-named path, inside one, or one of its parent folders."""
    if not isinstance(filename, (str, os.PathLike)):
        return False
    f = os.path.abspath(os.fspath(filename))
    return any(f == p or f.startswith(p + os.sep) or p.startswith(f + os.sep) for p in paths)


def user_error_message(error: BaseException, argv: Iterable[str]) -> str | None:
    """The one-line message for an error the user can act on; None for a programming error."""
    if isinstance(error, JaxdetoxError):
        return str(error)
    if isinstance(error, OSError):
        if error.errno is None and error.args:  # raised by the project with its own message
            return str(error)
        paths = user_paths(argv)
        for name in (error.filename, error.filename2):
            if _on_user_path(name, paths):
                return f"{name}: {error.strerror or error}"
    return None


def debug_requested(flag: bool) -> bool:
    """Whether to show tracebacks: `--debug`, or `JAXDETOX_DEBUG` set to anything but 0/empty."""
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")
