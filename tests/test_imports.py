"""Package layering: `jaxdetox.models` never imports the sampler (`jaxdetox.lm` sits above both)."""

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
