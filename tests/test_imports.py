"""Package layering, checked on the import statements of every module:

    commands/, cli.py    the command line (argparse; `execute` in commands/session.py)
    planning/            the memory planner, the `--dry-run` plan, start-up checks
    methods/             the method registry: each method's plan and stage trainers
    pipeline/            a run: experiment parts, run dir, flow, stages, the one executor
    evaluate/            metrics and the report (reads run directories)
    lm.py                `LanguageModel`, above models/ and sampling/
    models/ losses/ sampling/ train/ data/ oracles/   the library the pipeline is built on

A package imports only from its own layer or below (the pipeline never imports argparse,
the command line or the planner; models and losses never import the pipeline), no module
imports another's private (`_name`) names, `jaxdetox.models` never imports the sampler, and
library code never imports the full-logit loss references (`jaxdetox.losses.reference`)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
import jaxdetox.models
loaded = sorted(m for m in sys.modules if m.startswith("jaxdetox.sampling"))
assert not loaded, f"import jaxdetox.models imported {loaded}"
import jaxdetox.losses
assert not any(m.startswith("jaxdetox.sampling") for m in sys.modules), "losses import sampling"
from jaxdetox.models import LanguageModel, load_pretrained, random_init
import jaxdetox, jaxdetox.lm
assert load_pretrained is jaxdetox.load_pretrained is jaxdetox.lm.load_pretrained
assert LanguageModel is jaxdetox.lm.LanguageModel and random_init is jaxdetox.lm.random_init
"""


def test_models_do_not_import_sampling():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (`from a import b` gives `a` and `a.b`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                package = path.relative_to(ROOT).parent.parts
                base = ".".join([*package[: len(package) - node.level + 1], *filter(None, [base])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_library_never_imports_the_loss_references():
    """`jaxdetox.losses.reference` (full-logit forms) is for tests and benchmarks only."""
    offenders = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "jaxdetox").rglob("*.py"))
        if path.name != "reference.py" or path.parent.name != "losses"
        if "jaxdetox.losses.reference" in _imported_modules(path)
    ]
    assert not offenders, f"library modules import jaxdetox.losses.reference: {offenders}"


def _files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _package_of(path: Path) -> str:
    """`models`, `pipeline`, ... for a file in jaxdetox/ (`cli`, `lm` for top-level modules)."""
    parts = path.relative_to(ROOT / "jaxdetox").parts
    return parts[0].removesuffix(".py")


LOWER = ("models", "losses", "sampling", "train", "data", "oracles", "sharding", "fileio",
         "errors", "assets")  # fmt: skip
# What each part of the package may not import (a layer never reaches above itself).
FORBIDDEN = {
    **dict.fromkeys(
        LOWER, ("pipeline", "methods", "planning", "commands", "cli", "evaluate", "launch")
    ),
    "lm": ("pipeline", "methods", "planning", "commands", "cli"),
    "pipeline": ("planning", "commands", "cli"),
    "methods": ("planning", "commands", "cli"),
    "planning": ("commands", "cli"),
    "evaluate": ("planning", "commands", "cli"),
}


def test_each_layer_imports_only_its_own_layer_or_below():
    offenders = []
    for path in _files("jaxdetox"):
        package = _package_of(path)
        banned = FORBIDDEN.get(package, ())
        for name in _imported_modules(path):
            parts = name.split(".")
            if parts[0] in ("tests", "benchmarks", "experiments"):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
            elif parts[0] == "jaxdetox" and len(parts) > 1 and parts[1] in banned:
                offenders.append(f"{path.relative_to(ROOT)} ({package}) imports {name}")
    assert not offenders, "layering broken:\n  " + "\n  ".join(sorted(set(offenders)))


def test_only_the_command_line_imports_argparse():
    """argparse belongs to cli.py, commands/ and the launch scripts' flags (launch/)."""
    offenders = [
        str(path.relative_to(ROOT))
        for path in _files("jaxdetox")
        if _package_of(path) not in ("cli", "commands", "launch")
        if "argparse" in _imported_modules(path)
    ]
    assert not offenders, f"library modules import argparse: {offenders}"


def _is_module(package: str, name: str) -> bool:
    """Whether `from package import name` imports a module (a private helper module such as
    `tests._enumeration` is its package's own)."""
    folder = ROOT.joinpath(*package.split("."))
    return (folder / f"{name}.py").exists() or (folder / name / "__init__.py").exists()


def test_no_module_imports_another_modules_private_names():
    """`from a import _b` (a private name of another module of the library or the
    benchmarks) nowhere: library, tests, benchmarks, experiments. A name another module
    needs is public, with a docstring."""
    offenders = []
    for path in _files("jaxdetox", "tests", "benchmarks", "experiments"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                if node.module.split(".")[0] not in ("jaxdetox", "benchmarks"):
                    continue  # tests share helpers among themselves
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private and not _is_module(node.module, alias.name):
                        where = f"{path.relative_to(ROOT)}:{node.lineno}"
                        offenders.append(f"{where}: from {node.module} import {alias.name}")
    assert not offenders, "private names imported across modules:\n  " + "\n  ".join(offenders)
