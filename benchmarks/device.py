"""The accelerator figures of issue 24, in one prepared script and one JSON.

    python -m benchmarks.device [--out FILE] [--dry-run] [--budget-s 450]

On one GPU (meant to finish in under 8 minutes, compiles included) it measures:

1. `sampler`: new tokens/s of `sample_prompts` against `transformers.generate` on the same
   device at the RealToxicityPrompts workload (prompts of <= 30 tokens, 25 samples, top-k 50,
   20 new tokens) for a ~1B Llama in bfloat16, and the NADO-guided overhead (guided / plain
   time, a separate 2-layer NADO) — `benchmarks.sampling_bench.rtp` / `nado_overhead`;
2. `attention`: cuDNN flash attention (`jax.nn.dot_product_attention`, via
   `jaxdetox.models.attention.attend`) against the einsum reference at a training shape with
   causal, segment and left-padding masks: largest difference on the real rows, forward and
   forward + backward times (and the XLA implementation likewise);
3. `mfu`: model FLOP utilisation of `lm_step` (the regularised LLM step: NLL + KL to the
   guided teacher), `nado_step` and `joint_step` for the ~1B Llama in bfloat16 (float32
   master weights). Model FLOPs from `jaxdetox.train.flops`, the peak from the device kind
   (`flops.device_peak_flops`, a datasheet table; on CPU the measured fp32 matmul peak);
4. `memory`: every stage's compiled memory (`.compile().memory_analysis()`: arguments +
   outputs − donated aliases + temporaries) against the memory planner
   (`jaxdetox.planning.memory.Planner`) for the ~1B Llama trained in full and for Llama-2-7B with
   LoRA (`experiments/llama2-7b/pr_lora_1gpu.yaml`). Compile only: every state is abstract
   (`jax.eval_shape`), nothing is allocated.

Sections run in that order (the PyTorch model leaves the GPU before JAX takes its memory for
the train steps). Every figure has `status` (`measured` | `skipped` | `failed`) and a
`reason` when not measured (no GPU, no cuDNN, time budget, the error); a section that fails
records its error and the others still run. `--dry-run` runs the same code at toy shapes on
CPU (tests/test_benchmarks_device.py checks its JSON). No accelerator has run it yet: the
figures in `benchmarks/results/device.json` will be the first.
"""

from __future__ import annotations

import os

# Before JAX starts: PyTorch shares the GPU in the sampler section, so JAX must not take 75 %
# of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._results import alternate, machine_info, write_results  # noqa: E402

SCHEMA_VERSION = 1
SECTIONS = ("sampler", "attention", "mfu", "memory")
STATUSES = ("measured", "skipped", "failed")
# summary key -> (comparison, target) of issue 24 (benchmarks, never test assertions).
TARGETS = {
    "joint_step_mfu": (">=", 0.45),
    "sampler_rtp_vs_hf": (">=", 3.0),
    "memory_worst_plan_over_xla": ("within", 0.15),
}
LLAMA_2_7B_YAML = Path(__file__).parents[1] / "experiments/llama2-7b/pr_lora_1gpu.yaml"


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What one invocation measures: the GPU shapes, or toy ones for `--dry-run`."""

    lm: dict  # ModelConfig fields of the ~1B Llama (bfloat16 compute, float32 masters)
    big: dict | None  # ModelConfig fields replacing Llama-2-7B's (None: the real shape)
    batch: int  # train-step rows
    length: int  # train-step tokens per row
    nado_layers: int
    rtp_prompts: int
    rtp_samples: int
    rtp_new_tokens: int
    rtp_max_prompt: int
    rtp_batch: int  # prompts per sampler call
    attention: tuple[int, int, int, int, int]  # B, T, heads, KV heads, head_dim
    reps: int
    run_overrides: tuple[str, ...]  # run-config overrides of the memory section's shapes


LLAMA_1B = dict(  # Llama-3.2-1B's shape (benchmarks/mfu.py)
    family="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
    num_kv_heads=8, head_dim=64, intermediate_size=8192, max_position_embeddings=8192,
    rope_theta=500000.0, tie_word_embeddings=True, eos_token_id=128001,
)  # fmt: skip
TOY = dict(
    family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, intermediate_size=128, max_position_embeddings=256, eos_token_id=1,
)  # fmt: skip
FULL = Shapes(
    lm=LLAMA_1B, big=None, batch=4, length=2048, nado_layers=2, rtp_prompts=16,
    rtp_samples=25, rtp_new_tokens=20, rtp_max_prompt=30, rtp_batch=8,
    attention=(4, 2048, 32, 8, 64), reps=3, run_overrides=(),
)  # fmt: skip
DRY = Shapes(
    lm=TOY, big=TOY, batch=2, length=32, nado_layers=1, rtp_prompts=2, rtp_samples=3,
    rtp_new_tokens=4, rtp_max_prompt=10, rtp_batch=2, attention=(2, 32, 4, 2, 16), reps=1,
    run_overrides=(
        "finetune.batch_size=2", "train_nado.batch_size=2", "sampling.batch_size=2",
        "sampling.num_samples=2", "sampling.max_new_tokens=4", "eval.batch_size=2",
        "eval.num_samples=2", "eval.max_new_tokens=4", "prompts.max_tokens=7",
    ),
)  # fmt: skip


class Skip(Exception):
    """A figure that cannot be measured here; the message is the recorded reason."""


def figure(fn: Callable[[], dict], *, budget: Budget, estimate_s: float = 0.0) -> dict:
    """Run one figure: its values with `status: measured`, or `skipped` / `failed` and why."""
    if budget.left() < estimate_s:
        return {"status": "skipped", "reason": f"time budget ({budget.left():.0f} s left)"}
    start = time.perf_counter()
    try:
        values = fn()
        out = {"status": "measured", "reason": None, **values}
    except Skip as why:
        out = {"status": "skipped", "reason": str(why)}
    except Exception as error:  # noqa: BLE001 - recorded, the other figures still run
        traceback.print_exc()
        out = {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:2000]}
    out["wall_s"] = round(time.perf_counter() - start, 2)
    print(f"  {out['status']:<8} ({out['wall_s']} s) {out.get('reason') or ''}", flush=True)
    return out


@dataclasses.dataclass
class Budget:
    """Wall seconds left for the run (figures past it are skipped, not cut off)."""

    seconds: float
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def left(self) -> float:
        """Seconds left."""
        return self.seconds - (time.perf_counter() - self.start)


def lm_config(shapes: Shapes) -> Any:
    """The ~1B (or toy) Llama in bfloat16 compute with float32 master weights."""
    from jaxdetox.models import ModelConfig

    return ModelConfig(**shapes.lm, param_dtype="float32", dtype="bfloat16")


def one_device_mesh() -> Any:
    """A (1, 1, 1) mesh on the first device."""
    from jaxdetox import sharding

    return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


def _free_device() -> None:
    """Drop what earlier sections left on the device (JAX caches, PyTorch's allocator)."""
    gc.collect()
    jax.clear_caches()
    with contextlib.suppress(ImportError):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- sampler


def hf_twin(config: Any) -> Any:
    """A random transformers model of the same architecture, bf16, on the GPU if any."""
    import torch
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return model.to(torch.bfloat16).eval()


def section_sampler(shapes: Shapes, budget: Budget) -> dict:
    """Sampler vs `transformers.generate` at the RTP workload, and the NADO-guided overhead."""
    from benchmarks import sampling_bench
    from jaxdetox.lm import random_init

    config = lm_config(shapes)
    state: dict[str, Any] = {}

    def build() -> dict:
        start = time.perf_counter()
        state["lm"] = random_init(config, 0)
        state["hf"] = hf_twin(config)
        return {
            "build_s": round(time.perf_counter() - start, 2),
            "hf_device": str(state["hf"].device),
        }

    def rtp() -> dict:
        if "hf" not in state:
            raise Skip("the models were not built")
        return sampling_bench.rtp(
            state["hf"], state["lm"], prompts=shapes.rtp_prompts, samples=shapes.rtp_samples,
            new=shapes.rtp_new_tokens, max_prompt=shapes.rtp_max_prompt,
            batch_size=shapes.rtp_batch, reps=shapes.reps, vocab=config.vocab_size,
        )  # fmt: skip

    def nado() -> dict:
        if "lm" not in state:
            raise Skip("the model was not built")
        state.pop("hf", None)
        _free_device()
        return sampling_bench.nado_overhead(
            state["lm"], batch=shapes.rtp_batch * shapes.rtp_samples,
            prompt=shapes.rtp_max_prompt, new=shapes.rtp_new_tokens, reps=shapes.reps,
            vocab=config.vocab_size,
        )  # fmt: skip

    out = {
        "model": {"config": shapes.lm, "dtype": "bfloat16"},
        "build": figure(build, budget=budget),
        "rtp": figure(rtp, budget=budget, estimate_s=30),
        "nado_guided": figure(nado, budget=budget, estimate_s=20),
    }
    state.clear()
    _free_device()
    return out


# ----------------------------------------------------------------------------- attention


def attention_inputs(shape: tuple[int, ...], dtype: Any) -> tuple:
    """Random q, k, v and a `[B, T, T]` mask: causal, two packed segments in row 0, left
    padding (a quarter of the row) in the others; and the real (non-padding) query rows."""
    from jaxdetox.models.layers import attention_mask

    b, t, n, kvh, h = shape
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    k = jnp.asarray(rng.standard_normal((b, t, kvh, h)), dtype)
    v = jnp.asarray(rng.standard_normal((b, t, kvh, h)), dtype)
    seg = np.ones((b, t), np.int32)
    seg[0, t // 2 :] = 2
    seg[1:, : t // 4] = 0
    slots = jnp.arange(t, dtype=jnp.int32)
    seg = jnp.asarray(seg)
    return q, k, v, attention_mask(seg, seg, slots, slots), np.asarray(seg) != 0


def section_attention(shapes: Shapes, budget: Budget) -> dict:
    """cuDNN (and XLA) attention against the einsum reference: equal results, time."""
    from jaxdetox.models import attention

    platform = attention.current_platform()
    b, t, n, kvh, h = shapes.attention
    q, k, v, mask, real_bt = attention_inputs(shapes.attention, jnp.bfloat16)

    def compiled(impl: str) -> tuple[Callable, Callable]:
        fwd = jax.jit(lambda q, k, v, m: attention.attend(q, k, v, m, impl))

        def loss(q, k, v, m):  # noqa: ANN001, ANN202
            return jnp.sum(attention.attend(q, k, v, m, impl).astype(jnp.float32) ** 2)

        return fwd, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    ref_fwd, ref_grad = compiled("einsum")
    reference = np.asarray(ref_fwd(q, k, v, mask), np.float32)

    def compare(impl: str) -> Callable[[], dict]:
        def run() -> dict:
            try:  # the selection's own check, on this platform and shape
                attention.select_attention(
                    impl, platform=platform, dtype=jnp.bfloat16, head_dim=h, q_len=t,
                    kv_len=t, cached=False,
                )  # fmt: skip
            except ValueError as why:
                raise Skip(str(why)) from None
            fwd, grad = compiled(impl)
            got = np.asarray(fwd(q, k, v, mask), np.float32)
            diff = np.abs(got - reference)[real_bt]
            timing = alternate(
                {
                    "einsum_fwd": lambda: jax.block_until_ready(ref_fwd(q, k, v, mask)),
                    f"{impl}_fwd": lambda: jax.block_until_ready(fwd(q, k, v, mask)),
                    "einsum_fwd_bwd": lambda: jax.block_until_ready(ref_grad(q, k, v, mask)),
                    f"{impl}_fwd_bwd": lambda: jax.block_until_ready(grad(q, k, v, mask)),
                },
                max(shapes.reps, 3),
            )
            med = timing["median_s"]
            return {
                "max_abs_diff_real_rows": float(diff.max()),
                "mean_abs_diff_real_rows": float(diff.mean()),
                "padding_rows_finite": bool(np.isfinite(got).all()),
                **timing,
                "speedup_fwd": round(med["einsum_fwd"] / med[f"{impl}_fwd"], 3),
                "speedup_fwd_bwd": round(med["einsum_fwd_bwd"] / med[f"{impl}_fwd_bwd"], 3),
            }

        return run

    return {
        "shape": {"batch": b, "length": t, "heads": n, "kv_heads": kvh, "head_dim": h},
        "dtype": "bfloat16",
        "platform": {"name": platform.name, "cudnn": platform.cudnn},
        "auto_selects": attention.select_attention(
            "auto",
            platform=platform,
            dtype=jnp.bfloat16,
            head_dim=h,
            q_len=t,
            kv_len=t,
            cached=False,
        ),  # fmt: skip
        "cudnn_vs_einsum": figure(compare("cudnn"), budget=budget, estimate_s=10),
        "xla_vs_einsum": figure(compare("xla"), budget=budget, estimate_s=10),
    }


# ----------------------------------------------------------------------------- MFU


def section_mfu(shapes: Shapes, budget: Budget) -> dict:
    """MFU of `lm_step`, `nado_step` and `joint_step` (the ~1B Llama, bf16, one device)."""
    from benchmarks._batches import LR, make_stream, with_labels
    from benchmarks._jax_steps import Ours
    from jaxdetox.lm import random_init
    from jaxdetox.models import NadoConfig, init_nado
    from jaxdetox.train import OptimizerConfig, joint_step, lm_step, make_training, nado_step
    from jaxdetox.train import flops as train_flops

    config = lm_config(shapes)
    mesh = one_device_mesh()
    lm = random_init(config, 0, mesh=mesh)
    nado_config = NadoConfig.for_lm(
        config, "separate", num_layers=shapes.nado_layers, head_init="normal"
    )
    nado = init_nado(nado_config, 0, lm_model=lm.model, mesh=mesh)
    opt = OptimizerConfig(learning_rate=LR)
    tr = make_training(lm.model, nado, mesh, lm_optimizer=opt, nado_optimizer=opt)
    del lm, nado
    rng = np.random.default_rng(0)
    b, t = shapes.batch, shapes.length
    samples = {"samples": with_labels(make_stream(rng, b, t, config.vocab_size), rng)}
    ours = Ours(tr, mesh)
    peak, peak_source = train_flops.device_peak_flops()
    tokens, body = b * t, nado_config.body
    model_flops = {
        "lm_step": train_flops.lm_step_flops(
            config, body, tokens=tokens, kl_tokens=tokens, seq_len=t
        ).total,
        "nado_step": train_flops.nado_step_flops(
            config, body, tokens=tokens, seq_len=t, consistency=False
        ).total,
        "joint_step": train_flops.lm_step_flops(
            config, body, tokens=tokens, kl_tokens=tokens, seq_len=t, nado_trained=True
        ).total,
    }
    steps = {"lm_step": lm_step, "nado_step": nado_step, "joint_step": joint_step}

    def measure(name: str) -> Callable[[], dict]:
        def run() -> dict:
            ours.runner(name, steps[name])
            compile_s, xla_flops = ours.compile(name, samples)
            timing = alternate({name: lambda: ours.step(name, samples)}, shapes.reps)
            seconds = timing["median_s"][name]
            return {
                "compile_s": round(compile_s, 2),
                **timing,
                "model_flops": model_flops[name],
                "xla_cost_analysis_flops": xla_flops,
                "tokens_per_s": round(tokens / seconds, 1),
                "mfu": round(model_flops[name] / seconds / peak, 4),
            }

        return run

    out = {
        "model": {"config": shapes.lm, "dtype": "bfloat16", "param_dtype": "float32"},
        "batch": b,
        "length": t,
        "nado_layers": shapes.nado_layers,
        "peak_flops": peak,
        "peak_source": peak_source,
    }
    for name in steps:
        out[name] = figure(measure(name), budget=budget, estimate_s=20)
        ours.runners.pop(name, None)  # each executable leaves the device after its figure
    ours.state = tr = None  # the train state leaves the device before the next section
    _free_device()
    return out


# ----------------------------------------------------------------------------- memory


def _abstract_training(planner: Any, stage: str, mesh: Any) -> Any:
    """The stage's `Training` with an abstract state (`jax.eval_shape`: nothing allocated)."""
    from flax import nnx

    from jaxdetox.models import lora
    from jaxdetox.models.nado import NadoModel
    from jaxdetox.models.registry import family_module
    from jaxdetox.pipeline.recipe import nado_optimizer_config, optimizer_config
    from jaxdetox.train import make_training

    config, cls = planner.config, family_module(planner.lm_config).MODEL_CLASS
    captured = {}

    def build() -> Any:
        lm = cls(planner.lm_config, rngs=nnx.Rngs(0))
        lc = config.finetune.lora
        if lc is not None and stage == "finetune":
            lm = lora.add_adapters(lm, lora.LoraConfig(lc.rank, lc.alpha, tuple(lc.targets)))
        nado = NadoModel(planner.nado_config, rngs=nnx.Rngs(1))
        if stage == "finetune":
            tr = make_training(
                lm, nado, mesh, lm_optimizer=optimizer_config(config.finetune.optimizer),
                nado_optimizer=None,
                reference_dtype=None if lc is not None else config.finetune.reference_dtype,
            )  # fmt: skip
        else:  # as loop/training.train_nado_stage: the LLM's state dropped
            tr = make_training(
                lm, nado, mesh, lm_optimizer=None,
                nado_optimizer=nado_optimizer_config(config.train_nado),
            )  # fmt: skip
            tr = dataclasses.replace(
                tr, state=tr.state.replace(lm=None), shardings=tr.shardings.replace(lm=None)
            )
        captured["training"] = tr
        return tr.state

    state = jax.eval_shape(build)
    return dataclasses.replace(captured["training"], state=state)


def _xla_bytes(compiled: Any) -> dict:
    """XLA's memory of a compiled program: what it holds at once, and the parts."""
    m = compiled.memory_analysis()
    parts = {
        name: int(getattr(m, f"{name}_size_in_bytes", 0) or 0)
        for name in ("argument", "output", "alias", "temp")
    }
    total = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"]
    return {"xla_bytes": total, "xla_parts": parts}


def _compile_train_stage(planner: Any, stage: str, mesh: Any) -> Any:
    """The stage's train step compiled for the abstract state and batch."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxdetox.planning.memory import abstract_stream
    from jaxdetox.train import StepRunner, lm_step, nado_step

    tr = _abstract_training(planner, stage, mesh)
    if stage == "finetune":
        streams, step = planner.finetune_streams(), lm_step
    else:
        streams, step = {"samples": planner.nado_stream()}, nado_step
    batch = {}
    for name, (b, t) in streams.items():
        shapes = abstract_stream(b, t, labels=name == "samples")
        shapes.pop("nado_weight_b", None)  # made inside the step
        batch[name] = {
            k: jax.ShapeDtypeStruct(
                v.shape, v.dtype, sharding=NamedSharding(mesh, PartitionSpec(*[None] * v.ndim))
            )
            for k, v in shapes.items()
        }
    runner = StepRunner(
        functools.partial(step, models=tr.models, config=planner.step_config(stage)),
        mesh, tr.shardings, name=stage,
    )  # fmt: skip
    return runner.compile(tr.state, batch)


def _compile_sample_stage(planner: Any, rows: int, num_samples: int, new_tokens: int) -> Any:
    """The sampler's program (prefill + decode loop) for abstract weights and prompts."""
    from jaxdetox.models.registry import abstract_model
    from jaxdetox.sampling import SamplingConfig, decode_model_for
    from jaxdetox.sampling.decode import sample_loop

    model, params = decode_model_for(abstract_model(planner.lm_config))
    config = SamplingConfig(max_new_tokens=new_tokens, num_samples=num_samples, top_k=50)
    spec, values = config.static_spec(), config.runtime_values()
    prompts = rows // num_samples
    i32 = jax.ShapeDtypeStruct((prompts, planner.prompt_len), jnp.int32)

    def run(params, prompt_bp, segment_ids_bp, row_base_b, values):  # noqa: ANN001, ANN202
        return sample_loop(
            model, None, spec, params, None, prompt_bp, segment_ids_bp, row_base_b, values
        )

    row_base = jax.ShapeDtypeStruct((prompts,), jnp.int32)
    weights = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    return jax.jit(run).lower(params, i32, i32, row_base, values).compile(), weights


def memory_case(name: str, shapes: Shapes, budget: Budget) -> dict:
    """Every stage's compiled memory against the planner for one model and run config."""
    from jaxdetox.config import load_config
    from jaxdetox.models import ModelConfig
    from jaxdetox.models.hf import read_config
    from jaxdetox.planning.memory import Planner

    if name == "llama_1b_full":
        run_config = load_config(
            None, ["model.dtype=bfloat16", "model.param_dtype=float32", *shapes.run_overrides]
        )
        model_config = lm_config(shapes)
    else:  # Llama-2-7B with LoRA on one GPU (bf16 base, remat)
        run_config = load_config(LLAMA_2_7B_YAML, list(shapes.run_overrides))
        model_config = ModelConfig.from_hf(read_config(LLAMA_2_7B_YAML.parent / "Llama-2-7b-hf"))
        if shapes.big is not None:
            model_config = ModelConfig(**shapes.big)
    planner = Planner(run_config, model_config, prefix_tokens=1)
    plan = planner.plan({"data": 1, "fsdp": 1, "tensor": 1})
    mesh = one_device_mesh()
    s, e = run_config.sampling, run_config.eval
    compilers = {
        "sample": lambda: _compile_sample_stage(
            planner, s.batch_size * s.num_samples, s.num_samples, s.max_new_tokens
        ),
        "train_nado": lambda: (_compile_train_stage(planner, "train_nado", mesh), 0),
        "finetune": lambda: (_compile_train_stage(planner, "finetune", mesh), 0),
    }
    if e.enabled:
        compilers["eval"] = lambda: _compile_sample_stage(
            planner, e.batch_size * e.num_samples, e.num_samples, e.max_new_tokens
        )

    def measure(stage: str) -> Callable[[], dict]:
        def run() -> dict:
            start = time.perf_counter()
            compiled, held_weights = compilers[stage]()
            compile_s = time.perf_counter() - start
            xla = _xla_bytes(compiled)
            # The sampler's arguments are the LLM's weights, which the planner counts among
            # the versions the run holds between stages (not in the stage's own rows).
            xla["xla_bytes"] -= held_weights
            xla["held_weights_left_out"] = held_weights
            planned = plan.stage(stage).step_bytes
            return {
                "compile_s": round(compile_s, 2),
                **xla,
                "planned_bytes": int(planned),
                "planned_rows": {
                    r.name: int(r.bytes) for r in plan.stage(stage).rows if not r.held
                },
                "plan_over_xla": round(planned / xla["xla_bytes"], 4),
            }

        return run

    out: dict[str, Any] = {
        "model": {"layers": model_config.num_layers, "hidden": model_config.hidden_size,
                  "vocab": model_config.vocab_size},
        "lora": run_config.finetune.lora is not None,
        "remat": run_config.model.remat,
        "dtype": run_config.model.dtype,
        "param_dtype": run_config.model.param_dtype,
    }  # fmt: skip
    for stage in compilers:
        out[stage] = figure(measure(stage), budget=budget, estimate_s=15)
        gc.collect()
    return out


def section_memory(shapes: Shapes, budget: Budget) -> dict:
    """Compiled memory of every stage against the planner: 1B full and 7B LoRA."""
    return {
        name: memory_case(name, shapes, budget) for name in ("llama_1b_full", "llama_2_7b_lora")
    }


# ----------------------------------------------------------------------------- report


def _measured(fig: Any, key: str) -> float | None:
    return fig.get(key) if isinstance(fig, dict) and fig.get("status") == "measured" else None


def summary(sections: dict) -> dict:
    """The headline figures (None where not measured)."""
    mfu, sampler = sections.get("mfu", {}), sections.get("sampler", {})
    attention = sections.get("attention", {})
    ratios = [
        fig["plan_over_xla"]
        for case in sections.get("memory", {}).values()
        if isinstance(case, dict)
        for fig in case.values()
        if isinstance(fig, dict) and fig.get("status") == "measured"
    ]
    worst = max(ratios, key=lambda r: abs(r - 1.0)) if ratios else None
    return {
        "lm_step_mfu": _measured(mfu.get("lm_step"), "mfu"),
        "nado_step_mfu": _measured(mfu.get("nado_step"), "mfu"),
        "joint_step_mfu": _measured(mfu.get("joint_step"), "mfu"),
        "sampler_rtp_vs_hf": _measured(sampler.get("rtp"), "speedup"),
        "nado_guided_over_plain": _measured(sampler.get("nado_guided"), "guided_over_plain"),
        "memory_worst_plan_over_xla": worst,
        "cudnn_max_abs_diff": _measured(attention.get("cudnn_vs_einsum"), "max_abs_diff_real_rows"),
        "cudnn_speedup_fwd_bwd": _measured(attention.get("cudnn_vs_einsum"), "speedup_fwd_bwd"),
    }


def run(shapes: Shapes, *, dry_run: bool, budget_s: float, only: tuple[str, ...]) -> dict:
    """Every section of `only`, in order, within `budget_s`; the report as a dict."""
    budget = Budget(budget_s)
    if not dry_run and jax.default_backend() == "cpu":
        print("no accelerator: the GPU figures will say so (use --dry-run for toy shapes)")
    sections: dict[str, Any] = {}
    fns = {
        "sampler": section_sampler,
        "attention": section_attention,
        "mfu": section_mfu,
        "memory": section_memory,
    }
    for name in only:
        print(f"[{name}] ({budget.left():.0f} s left)", flush=True)
        sections[name] = figure(functools.partial(fns[name], shapes, budget), budget=budget)
    return {
        "schema_version": SCHEMA_VERSION,
        "dry_run": dry_run,
        "machine": machine_info(),
        "budget_s": budget_s,
        "wall_s": round(budget_s - budget.left(), 1),
        "sections": sections,
        "summary": summary(sections),
        "targets": {k: {"comparison": c, "value": v} for k, (c, v) in TARGETS.items()},
    }


def _finite(tree: Any) -> Any:
    """The report with non-finite floats as None (JSON has no NaN)."""
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_finite(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def main(argv: list[str] | None = None) -> dict:
    """CLI: run, write the JSON, print the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results/device.json")
    ap.add_argument("--dry-run", action="store_true", help="toy shapes on CPU (CI)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip figures past this")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    args = ap.parse_args(argv)
    only = tuple(s for s in args.only.split(",") if s)
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        ap.error(f"--only: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    report = _finite(
        run(DRY if args.dry_run else FULL, dry_run=args.dry_run, budget_s=args.budget_s, only=only)
    )
    write_results(args.out, report)
    for key, value in report["summary"].items():
        print(f"  {key:<28} {value}")
    return report


if __name__ == "__main__":
    main()
