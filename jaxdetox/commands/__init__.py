"""Subcommands of the `jaxdetox` CLI: one module per command, each with `register(subparsers)`;
`session.py` (config resolution, the run directory, `execute`) and `stage_command.py` (the
one-stage commands' shared body) are the helpers they share."""
