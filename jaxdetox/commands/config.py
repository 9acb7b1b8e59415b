"""`jaxdetox config [CONFIG.yaml] [key=value ...]`: the resolved config, or every field.

    jaxdetox config experiments/tiny/pr_sequential.yaml finetune.kl_weight=0.5
    jaxdetox config --fields                 # every field: type, default, description
    jaxdetox config --fields finetune        # the fields of one section

Prints the config a run would use, as YAML (what `RUN/config.yaml` keeps): the file with
the overrides applied and every default filled in, after validation (the error names the
field). Without CONFIG: the defaults. `--fields` lists every field of the schema instead,
as `dotted.name: type = default  # description`; a section argument narrows it.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Iterator
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `config` subcommand."""
    p = subparsers.add_parser(
        "config",
        help="print the resolved config of CONFIG + overrides, or every field (--fields)",
        description=__doc__,
    )
    p.add_argument(
        "config",
        nargs="?",
        help="CONFIG.yaml (default: none, all defaults); with --fields: a section to list",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    p.add_argument(
        "--fields",
        action="store_true",
        help="list every config field with its type, default and description",
    )
    p.set_defaults(func=run)


def section_of(annotation: Any) -> type | None:
    """The config section class inside an annotation (`X`, `X | None`, `list[X]`), if any."""
    from jaxdetox.config import Section

    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in typing.get_args(annotation):
        inner = section_of(arg)
        if inner is not None:
            return inner
    return None


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    text = text or str(annotation)
    return text.replace("typing.", "").replace("jaxdetox.config.", "")


def describe_fields(model: type, prefix: str = "") -> Iterator[str]:
    """One line per field of `model`, sections expanded: `name: type = default  # description`
    (a list of sections is shown as `name[]`)."""
    from pydantic_core import PydanticUndefined

    from jaxdetox.config import Section

    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        section = section_of(field.annotation)
        if field.default_factory is not None:
            default = field.default_factory()
        else:
            default = field.default
        shown = " = (required)" if default is PydanticUndefined else f" = {default!r}"
        note = f"  # {field.description}" if field.description else ""
        if section is not None:
            is_list = typing.get_origin(field.annotation) is list
            if isinstance(default, Section):  # a section always present: its fields follow
                shown = ""
            yield f"{path}{'[]' if is_list else ''}: {_type_name(field.annotation)}{shown}{note}"
            yield from describe_fields(section, f"{path}{'[]' if is_list else ''}.")
        else:
            yield f"{path}: {_type_name(field.annotation)}{shown}{note}"


def run(args: argparse.Namespace) -> int:
    """Print the resolved config, or the fields."""
    from jaxdetox.config import ConfigError, RunConfig, dump_config, load_config

    if args.fields:
        if args.overrides:
            raise ConfigError("--fields takes at most one section name, no overrides")
        lines = list(describe_fields(RunConfig))
        if args.config:
            chosen = [
                ln for ln in lines if ln.split(":")[0].split(".")[0].rstrip("[]") == args.config
            ]
            if not chosen:
                sections = sorted({ln.split(":")[0].split(".")[0].rstrip("[]") for ln in lines})
                raise ConfigError(
                    f"--fields {args.config}: no such section; one of {', '.join(sections)}"
                )
            lines = chosen
        print("\n".join(lines))
        return 0
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path and not config_path.endswith(".yaml"):
        config_path, overrides = None, [config_path, *overrides]
    print(dump_config(load_config(config_path, overrides)), end="")
    return 0
