"""Forward-pass throughput on CPU: our JAX model vs HF PyTorch, same weights, same batch.

    python benchmarks/forward_bench.py [--models gpt2,smollm2] [--batch 8] [--length 128]

Both sides run the same randomly initialised checkpoint (HF builds it, we load it) and the
timed repetitions alternate between the two so shared-CPU noise hits both alike. Compile
time (jit lower + compile) is reported separately from steady-state time. Writes
benchmarks/results/forward.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers
from _results import write_results
from flax import nnx

from jaxdetox.models import load_pretrained

HF_CONFIGS = {
    # GPT-2 small (124M).
    "gpt2": ("GPT2Config", dict(vocab_size=50257)),
    # SmolLM2-135M shapes (the built-in demo model): GQA 9/3 heads, 30 layers, tied.
    "smollm2": (
        "LlamaConfig",
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
            rope_theta=100000.0,
        ),
    ),
}


def bench(name: str, batch: int, length: int, reps: int) -> dict:
    cls, kwargs = HF_CONFIGS[name]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kwargs)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        lm = load_pretrained(d)
    n_params = sum(p.numel() for p in hf.parameters())
    tokens = np.random.default_rng(0).integers(0, kwargs["vocab_size"], (batch, length))
    tokens = tokens.astype(np.int32)
    tokens_pt = torch.tensor(tokens, dtype=torch.long)

    graphdef, state = nnx.split(lm.model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    t0 = time.perf_counter()
    compiled = fwd.lower(state, tokens).compile()
    compile_s = time.perf_counter() - t0

    def run_ours() -> np.ndarray:
        return np.asarray(jax.block_until_ready(compiled(state, tokens)))

    def run_hf() -> np.ndarray:
        with torch.no_grad():
            return hf(tokens_pt).logits.numpy()

    ours, ref = run_ours(), run_hf()  # warm-up (and a correctness check on the same weights)
    times = {"jax": [], "torch": []}
    for _ in range(reps):
        for key, fn in (("jax", run_ours), ("torch", run_hf)):
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    n_tokens = batch * length
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "params": n_params,
        "batch": batch,
        "length": length,
        "reps": reps,
        "jax_compile_s": round(compile_s, 3),
        "jax_step_s_median": round(med["jax"], 4),
        "torch_step_s_median": round(med["torch"], 4),
        "jax_tokens_per_s": round(n_tokens / med["jax"], 1),
        "torch_tokens_per_s": round(n_tokens / med["torch"], 1),
        "jax_over_torch_speed": round(med["torch"] / med["jax"], 3),
        "jax_steps_s": [round(t, 4) for t in times["jax"]],
        "torch_steps_s": [round(t, 4) for t in times["torch"]],
        "max_abs_logit_diff": float(np.abs(ours - ref).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/forward.json")
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")  # fp32 on both sides
    results = [bench(m, args.batch, args.length, args.reps) for m in args.models.split(",")]
    report = {
        "benchmark": "forward",
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "load_avg_1m": os.getloadavg()[0],
        "results": results,
    }
    write_results(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
