"""Model FLOP utilisation of the train step on the default device (meant for an accelerator).

    python -m benchmarks.mfu [--batch 8 --length 2048 --reps 5] [--out FILE]

A ~1B Llama (Llama-3.2-1B's shape: 16 layers, d=2048, 32 heads / 8 KV heads, MLP 8192,
vocab 128256, tied head) with random weights, float32 parameters and bfloat16 compute,
trained by `sft_step` (AdamW, clip 1.0). Model FLOPs come from `jaxdetox.train.flops`
(matmul FLOPs of forward + backward), the peak from the device kind's datasheet
(`flops.device_peak_flops`; on CPU the measured fp32 matmul peak).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks._batches import LR, make_stream
from benchmarks._jax_steps import Ours
from benchmarks._results import alternate, machine_info, write_results
from jaxdetox import sharding
from jaxdetox.lm import random_init
from jaxdetox.models import ModelConfig
from jaxdetox.train import OptimizerConfig, make_training, sft_step
from jaxdetox.train import flops as train_flops

LLAMA_1B = ModelConfig(
    family="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
    num_kv_heads=8, head_dim=64, intermediate_size=8192, max_position_embeddings=8192,
    rope_theta=500000.0, tie_word_embeddings=True, param_dtype="float32", dtype="bfloat16",
)  # fmt: skip


def train_step_mfu(
    config: ModelConfig = LLAMA_1B, *, batch: int = 8, length: int = 2048, reps: int = 5
) -> dict:
    """Time `sft_step` on `config` with random weights on one device; its MFU."""
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    lm = random_init(config, 0, mesh=mesh)
    tr = make_training(
        lm.model, None, mesh, lm_optimizer=OptimizerConfig(learning_rate=LR), nado_optimizer=None
    )
    del lm
    stream = {"corpus": make_stream(np.random.default_rng(0), batch, length, config.vocab_size)}
    ours = Ours(tr, mesh)
    ours.runner("sft", sft_step)
    compile_s, xla_flops = ours.compile("sft", stream)
    timing = alternate({"sft": lambda: ours.step("sft", stream)}, reps)
    seconds = timing["median_s"]["sft"]
    flops = train_flops.lm_step_flops(
        config, None, tokens=batch * length, kl_tokens=0, seq_len=length
    ).lm
    peak, source = train_flops.device_peak_flops()
    params = sum(x.size for x in jax.tree.leaves(ours.state.lm.params))
    return {
        "model": {
            "family": config.family,
            "layers": config.num_layers,
            "hidden": config.hidden_size,
            "vocab": config.vocab_size,
            "params": int(params),
            "dtype": config.dtype,
            "param_dtype": config.param_dtype,
        },  # fmt: skip
        "batch": batch,
        "length": length,
        "device_kind": jax.devices()[0].device_kind,
        "compile_s": round(compile_s, 2),
        **timing,
        "model_flops": flops,
        "xla_cost_analysis_flops": xla_flops,
        "tokens_per_s": round(batch * length / seconds, 1),
        "peak_flops": peak,
        "peak_source": source,
        "mfu": round(flops / seconds / peak, 4),
    }


def main() -> None:
    """CLI: measure and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results/mfu.json")
    args = ap.parse_args()
    start = time.perf_counter()
    result = train_step_mfu(batch=args.batch, length=args.length, reps=args.reps)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    write_results(args.out, {"machine": machine_info(), "train_step_mfu": result})


if __name__ == "__main__":
    main()
