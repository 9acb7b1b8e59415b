"""Memory of a Llama-2-7B LoRA run on one device, from shapes only (nothing is allocated).

Every state is built abstractly (`nnx.eval_shape` / `jax.eval_shape`) with the same code a
run uses (`models.lora.add_adapters`, the NADO, optax's AdamW on the adapters), and the
LLM step `lm_step` is lowered and compiled for the abstract state and batch, so XLA's
`memory_analysis()` gives its temporaries (activations, the fused loss's chunks, gradients).
The compile is XLA:CPU's, so its temporaries are indicative of, not equal to, a GPU's.

    python benchmarks/lora_memory.py [--rank 16 --batch 8 --seq 64 --nado-layers 2]

Writes benchmarks/results/lora_memory_<dtype>.json. XLA:CPU has no bf16 matmuls: it converts
each bf16 layer's weights to f32 and keeps those copies for the whole step (about 0.75 GiB
per Llama-2-7B layer of temporaries), which a GPU does not; `--dtype float32` measures the
temporaries without that artefact (1.35 GiB at 32 layers, batch 8 x 64, remat). The numbers are in the comment of
experiments/llama2-7b/pr_lora_1gpu.yaml.
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from _results import write_results
from flax import nnx

from jaxdetox.models import ModelConfig, NadoConfig, lora
from jaxdetox.models.nado import NadoModel
from jaxdetox.models.registry import abstract_model, family_module
from jaxdetox.train import OptimizerConfig, StepConfig, lm_step
from jaxdetox.train.optimizer import make_optimizer
from jaxdetox.train.state import Models, ModelState, TrainState

RESULTS = Path(__file__).parent / "results" / "lora_memory_{dtype}.json"
LLAMA2_7B = {  # meta-llama/Llama-2-7b-hf config.json
    "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
GIB = 2**30


def nbytes(tree: object) -> int:
    """Bytes of every array leaf of an abstract tree."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def main() -> None:
    """Build the abstract states, compile the LoRA step, print and save the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="wq,wk,wv,wo,gate,up,down")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64, help="prompt + completion tokens")
    p.add_argument("--nado-layers", type=int, default=2)
    p.add_argument("--layers", type=int, default=32, help="fewer to see how memory scales")
    p.add_argument("--no-remat", action="store_true")
    p.add_argument("--dtype", default="bfloat16", help="base weights and compute dtype")
    args = p.parse_args()

    cfg = ModelConfig.from_hf({**LLAMA2_7B, "num_hidden_layers": args.layers}).replace(
        param_dtype=args.dtype, dtype=args.dtype, remat=not args.no_remat
    )
    lcfg = lora.LoraConfig(args.rank, 2.0 * args.rank, tuple(args.targets.split(",")))
    family = family_module(cfg)

    def build() -> nnx.Module:
        return lora.add_adapters(family.MODEL_CLASS(cfg, rngs=nnx.Rngs(0)), lcfg)

    model = nnx.eval_shape(build)
    graph, state = nnx.split(model, nnx.Param)
    base, adapters = lora.split_adapters(nnx.to_pure_dict(state))
    ref_graph = nnx.split(abstract_model(cfg), nnx.Param)[0]
    nado_cfg = NadoConfig.for_lm(cfg, "separate", num_layers=args.nado_layers)
    nado = nnx.eval_shape(lambda: NadoModel(nado_cfg, rngs=nnx.Rngs(0)))
    nado_graph, nado_state = nnx.split(nado, nnx.Param)
    nado_params = nnx.to_pure_dict(nado_state)

    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-4), 100, adapters)
    opt_state = jax.eval_shape(optimizer.init, adapters)
    step0 = jax.ShapeDtypeStruct((), jnp.int32)
    state = TrainState(
        lm=ModelState(step0, adapters, opt_state),
        nado=ModelState(step0, nado_params, ()),
        ref_params=base,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    models = Models(
        lm=graph, nado=nado_graph, lm_optimizer=optimizer, lm_schedule=schedule, lora=True,
        ref=ref_graph,
    )  # fmt: skip
    b, t = args.batch, args.seq
    i32, f32 = jnp.int32, jnp.float32
    stream = {
        "tokens_bt": jax.ShapeDtypeStruct((b, t), i32),
        "segment_ids_bt": jax.ShapeDtypeStruct((b, t), i32),
        "positions_bt": jax.ShapeDtypeStruct((b, t), i32),
        "targets_bt": jax.ShapeDtypeStruct((b, t), i32),
        "loss_mask_bt": jax.ShapeDtypeStruct((b, t), f32),
    }
    step_config = StepConfig(streams=(("samples", StepConfig().stream("samples")),))
    fn = functools.partial(lm_step, models=models, config=step_config)
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=(0,)).lower(state, {"samples": stream}).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0))

    rows = {
        f"base LLM weights, {args.dtype} (student base = reference, one copy in the state)": nbytes(
            base
        ),
        "base LLM weights held by the Experiment (sampling, next stages)": nbytes(base),
        "LoRA adapters, fp32": nbytes(adapters),
        "Adam moments of the adapters": nbytes(opt_state),
        "NADO params (frozen in this stage)": nbytes(nado_params),
        "NADO params held by the Experiment (initial + current)": 2 * nbytes(nado_params),
        f"step temporaries (XLA:CPU compile, batch {b} x {t} tokens, remat={cfg.remat})": temp,
    }
    total = sum(rows.values())
    n_base = sum(math.prod(x.shape) for x in jax.tree.leaves(base))
    n_ad = sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))
    print(f"Llama-2-7B: {n_base / 1e9:.2f}B base params, LoRA r={args.rank} on {lcfg.targets}: "
          f"{n_ad / 1e6:.1f}M adapter params ({100 * n_ad / n_base:.2f}%)")  # fmt: skip
    for name, value in rows.items():
        print(f"  {name:<78} {value / GIB:7.2f} GiB")
    print(f"  {'total (finetune stage)':<78} {total / GIB:7.2f} GiB   (compile {seconds:.0f} s)")
    write_results(
        str(RESULTS).format(dtype=args.dtype),
        {
            "model": "Llama-2-7B (shapes)", "rank": args.rank, "targets": list(lcfg.targets),
            "batch": b, "seq": t, "nado_layers": args.nado_layers,
            "base_params": n_base, "adapter_params": n_ad,
            "rows_gib": {k: round(v / GIB, 3) for k, v in rows.items()},
            "total_gib": round(total / GIB, 3), "compile_seconds": round(seconds, 1),
            "machine": platform.machine(), "jax": jax.__version__,
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
