"""Subcommands of the `jaxdetox` CLI: one module per command, each with `register(subparsers)`;
the modules in `HELPERS` are the helpers they share, not commands."""

HELPERS = ("session", "stage_command")
"""`session.py`: config resolution, the run directory, `execute`; `stage_command.py`: the
one-stage commands' shared body."""
