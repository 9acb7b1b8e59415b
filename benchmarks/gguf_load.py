"""Load time and peak host memory of the built-in GGUF: our importer vs transformers' GGUF loader,
and `jaxdetox convert default OUT`.

Each measurement runs in a fresh subprocess (peak RSS is per process); both run in the same
invocation, so their ratio is comparable on a shared machine. Writes
benchmarks/results/gguf_load.json.

    python benchmarks/gguf_load.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _results import write_results

CHILD = r"""
import json, resource, sys, time
mode = sys.argv[1]
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
if mode == "ours":
    import jax, numpy as np
    import gguf  # the libraries load_pretrained imports lazily: count them as imports, not load
    from transformers import LlamaConfig, PreTrainedTokenizerFast
    from jaxdetox.models import load_pretrained
    from jaxdetox.models.gguf import default_model_path
    path = default_model_path()
    base = rss(); t = time.perf_counter()
    lm = load_pretrained("default")
    jax.block_until_ready(jax.tree.leaves(lm.split()[1]))
    load_s = time.perf_counter() - t
    params = sum(x.size for x in jax.tree.leaves(lm.split()[1]))
    tokens = np.asarray([lm.tokenizer("What is the capital of France?")["input_ids"]], np.int32)
elif mode == "convert":
    import tempfile
    from jaxdetox.cli import main
    base = rss(); t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        assert main(["convert", "default", d]) == 0  # `jaxdetox convert default OUT`
    load_s = time.perf_counter() - t; params = None
else:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from jaxdetox.models.gguf import default_model_path
    path = default_model_path()
    base = rss(); t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    load_s = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
print(json.dumps({"mode": mode, "load_s": load_s, "rss_after_imports_mib": base,
                  "peak_rss_mib": rss(), "params": params}))
"""


def run(mode: str) -> dict:
    """One measurement in a fresh interpreter."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run both loaders (and the HF-directory conversion) and write the JSON report."""
    results = {mode: run(mode) for mode in ("ours", "transformers", "convert")}
    for r in results.values():
        r["peak_minus_imports_mib"] = r["peak_rss_mib"] - r["rss_after_imports_mib"]
    report = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_count": os.cpu_count(),
        "results": results,
        "load_time_ratio_ours_over_transformers": results["ours"]["load_s"]
        / results["transformers"]["load_s"],
    }
    out = Path(__file__).parent / "results" / "gguf_load.json"
    write_results(out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
