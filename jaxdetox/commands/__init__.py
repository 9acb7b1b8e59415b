"""Subcommands of the `jaxdetox` CLI: one module per command, each with `register(subparsers)`."""
