"""Package layering: `jaxdetox.models` never imports the sampler (`jaxdetox.lm` sits above both);
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
