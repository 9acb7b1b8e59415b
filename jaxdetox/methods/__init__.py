"""The method registry: every `method:` a run executes (docs/baselines.md), each with its
stage plan, the trainer of each stage, its rules and its description. The names of methods
come from here only; `config.RunConfig` validates `method:` against them.

    from jaxdetox.methods import method_of
    method_of("reinforce").plan(config)   # -> [Stage(...), ...] in the colocated order
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from jaxdetox.config import ConfigError, RunConfig
from jaxdetox.methods import baselines, regularized
from jaxdetox.methods.method import Method, StageFn

__all__ = [
    "REGISTRY",
    "Method",
    "StageFn",
    "exported",
    "is_finished",
    "method_of",
    "names",
    "run_finished",
    "write_sweep_index",
]

REGISTRY: dict[str, Method] = {m.name: m for m in (*baselines.METHODS, *regularized.METHODS)}
"""Every method by name."""

SWEEP_FILE = "sweep.json"


def names() -> tuple[str, ...]:
    """The method names, in the registry's order."""
    return tuple(REGISTRY)


def unknown_method(name: str) -> str:
    """The error message for a `method:` the registry does not have (with a close match)."""
    close = difflib.get_close_matches(name, names(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown method {name!r}; {hint}expected one of {', '.join(names())}"


def method_of(name: str) -> Method:
    """The registry entry of `name` (`ConfigError` naming the valid ones if none)."""
    if name not in REGISTRY:
        raise ConfigError(f"method: {unknown_method(name)}")
    return REGISTRY[name]


def exported(run_root: Path) -> bool:
    """Whether a run directory holds its exported LLM (`final/model/*.safetensors`)."""
    return any((run_root / "final" / "model").glob("*.safetensors"))


def is_finished(config: RunConfig, out: Path) -> bool:
    """Whether the run of `config` in `out` is finished (a sweep: each of its runs)."""
    method = method_of(config.method)
    if method.sweep is not None:
        return all(run_finished(c, p) for c, p in method.sweep(config, out))
    return run_finished(config, out)


def run_finished(config: RunConfig, out: Path) -> bool:
    """Whether every stage the method plans for the run directory `out` is done: every
    record `done` and, when it exports, the export written."""
    from jaxdetox.pipeline import flow
    from jaxdetox.pipeline.rundir import read_manifest

    if not out.is_dir():
        return False
    records = {(r["iteration"], r["stage"]): r for r in read_manifest(out)}
    stages = method_of(config.method).plan(config)
    export = any(s.name == "export" for s in stages)
    return not flow.not_done(stages, records) and (not export or exported(out))


def write_sweep_index(out: Path, method: str, runs: list[tuple[RunConfig, Path]]) -> None:
    """OUT/sweep.json: the sub-run directories (what `report` reads in their place)."""
    out.mkdir(parents=True, exist_ok=True)
    index = {"method": method, "runs": [p.name for _, p in runs]}
    (out / SWEEP_FILE).write_text(json.dumps(index, indent=2) + "\n")
