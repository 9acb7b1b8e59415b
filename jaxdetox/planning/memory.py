"""Per-device memory of a run's stages, planned from the config alone (no weights, no devices).

Every tree is abstract (`jax.eval_shape`, `nnx.eval_shape`): the parameters of the LLM, the
reference LLM and the NADO, the optimizer states (`optimizer.init` traced), and the
activations a training step keeps for its backward pass — the residuals JAX saves when it
differentiates the very loss the step runs (with the configured remat policy), read from the
traced program. Shards come from the one logical-axis rules table on an `AbstractMesh` of the
planned shape, so a v5p-128 mesh is planned on a laptop.

Per stage (`finetune`, `train_nado`, `sample`, `eval` run one after another; the peak is the
largest) the rows are what the stage's jitted step holds on one device, plus the artefacts
the run keeps between stages (`ArtefactTable.keep`: up to two LLM and two NADO versions).

What is exact and what is estimated (checked against XLA's `compiled.memory_analysis()` of the
real train step in tests/test_memory_plan.py):
- states, batch, held artefacts: exact (the same shapes and shardings as the run);
- saved activations: exact shapes; their per-device share is inferred from the dimensions
  (a dimension equal to the batch is split over data × fsdp, one equal to heads / MLP width /
  vocabulary over tensor);
- transient working sets (the one layer recomputed under remat or differentiated without
  it, the teacher's hidden states, the KL chunk's `[chunk, V]` blocks, float32 gradients)
  are what must coexist; XLA's buffer reuse and fusion decide the rest. The whole step is
  within ±20 % of XLA's figure on the tested configs (0.84× to 1.12× measured on CPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from jaxdetox import sharding
from jaxdetox.config import RunConfig
from jaxdetox.models.config import ModelConfig

GiB = 2**30

# One KL chunk step holds, in float32 [chunk tokens, V]: the student's logits / log p and p,
# the gradient g = (w + k)·p − w·onehot − k·q, the reference and NADO logits and the teacher
# log q / q (losses/fused.py). XLA fuses some of these; the plan counts the six.
KL_CHUNK_BLOCKS = 6


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    """An accelerator's memory and the share of it a run can plan on."""

    name: str
    memory: float  # bytes per device
    usable: float  # fraction available to the program
    note: str

    @property
    def budget(self) -> float:
        """Bytes a plan may use on one device."""
        return self.memory * self.usable


_GPU_FRACTION = 0.9  # XLA_PYTHON_CLIENT_MEM_FRACTION set by jaxdetox/launch/xla_flags.py
_TPU_FRACTION = 0.95  # HBM left after the runtime's own buffers (a margin, not a measurement)

DEVICE_KINDS: dict[str, DeviceKind] = {
    k.name: k
    for k in (
        DeviceKind("a100-40gb", 40e9, _GPU_FRACTION, "NVIDIA A100 40 GB"),
        DeviceKind("a100-80gb", 80e9, _GPU_FRACTION, "NVIDIA A100 80 GB"),
        DeviceKind("h100-80gb", 80e9, _GPU_FRACTION, "NVIDIA H100 80 GB"),
        DeviceKind("h200-141gb", 141e9, _GPU_FRACTION, "NVIDIA H200 141 GB"),
        DeviceKind("l4-24gb", 24e9, _GPU_FRACTION, "NVIDIA L4 24 GB"),
        DeviceKind("v4", 32 * GiB, _TPU_FRACTION, "TPU v4 chip, 32 GiB HBM"),
        DeviceKind("v5e", 16 * GiB, _TPU_FRACTION, "TPU v5e chip, 16 GiB HBM"),
        DeviceKind("v5p", 95e9, _TPU_FRACTION, "TPU v5p chip, 95 GB HBM"),
        DeviceKind("v6e", 32 * GiB, _TPU_FRACTION, "TPU v6e chip, 32 GiB HBM"),
    )
}


def device_kind(name: str) -> DeviceKind:
    """The `DeviceKind` called `name` (error lists the known ones)."""
    if name not in DEVICE_KINDS:
        raise ValueError(f"device kind {name!r}; known: {', '.join(DEVICE_KINDS)}")
    return DEVICE_KINDS[name]


# ----------------------------------------------------------------------------- plan values


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a stage's memory: per-device bytes; `held` = kept between stages."""

    name: str
    bytes: float
    held: bool = False


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """The memory of one stage on one device."""

    stage: str
    rows: tuple[Row, ...]

    @property
    def step_bytes(self) -> float:
        """What the stage's jitted program holds (arguments, outputs, temporaries)."""
        return sum(r.bytes for r in self.rows if not r.held)

    @property
    def total(self) -> float:
        """Step plus the artefacts held by the run."""
        return sum(r.bytes for r in self.rows)

    def row(self, name: str) -> float:
        """Bytes of the row whose name starts with `name`."""
        return next(r.bytes for r in self.rows if r.name.startswith(name))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device memory of every stage on one mesh shape."""

    sizes: dict[str, int]
    stages: tuple[StagePlan, ...]

    @property
    def peak(self) -> StagePlan:
        """The stage needing the most memory."""
        return max(self.stages, key=lambda s: s.total)

    def stage(self, name: str) -> StagePlan:
        """The plan of stage `name`."""
        return next(s for s in self.stages if s.stage == name)


# ----------------------------------------------------------------------------- helpers


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    """A device-less mesh of these `(data, fsdp, tensor)` sizes."""
    shape = tuple(sizes[a] for a in sharding.MESH_AXES)
    return AbstractMesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def _nbytes(shape: Iterable[int], dtype: Any) -> float:
    return float(math.prod(shape) * np.dtype(dtype).itemsize)


def sharded_bytes(tree: Any, shardings: Any, dtype: Any = None) -> float:
    """Per-device bytes of an abstract tree under matching shardings (largest shard)."""
    leaves = jax.tree.leaves(tree)
    specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return sum(
        _nbytes(s.shard_shape(tuple(x.shape)), dtype or x.dtype) for x, s in zip(leaves, specs)
    )


def _resized(value: int, size: int) -> int:
    return value // size if size > 1 and value % size == 0 else value


def activation_bytes(
    shapes: Iterable[jax.ShapeDtypeStruct],
    sizes: dict[str, int],
    batch: int,
    tensor_dims: set[int],
) -> float:
    """Per-device bytes of activations from their global shapes: the dimension equal to the
    batch splits over data × fsdp, one equal to a tensor-parallel width over tensor."""
    rows = sizes["data"] * sizes["fsdp"]
    total = 0.0
    for x in shapes:
        dims = list(x.shape)
        if batch in dims:
            i = dims.index(batch)
            dims[i] = _resized(dims[i], rows)
        for i, d in enumerate(dims):
            if d in tensor_dims and d % sizes["tensor"] == 0:
                dims[i] = d // sizes["tensor"]
                break
        total += _nbytes(dims, x.dtype)
    return total


def saved_activations(loss: Callable[..., Any], params: Any, *rest: Any) -> list[Any]:
    """Abstract residuals that `jax.vjp` of `loss(params, *rest)` w.r.t. `params` keeps for
    the backward pass (what remat does or does not recompute), leaving out the inputs
    themselves (already counted as state or batch). Works on abstract inputs."""

    def pullback(p: Any, *r: Any) -> Any:
        return jax.vjp(lambda q: loss(q, *r), p)[1]

    closed, out = jax.make_jaxpr(pullback, return_shape=True)(params, *rest)
    jaxpr = closed.jaxpr
    n = len(jax.tree.leaves(out))
    inputs = {id(v) for v in jaxpr.invars}
    seen: set[int] = set()
    kept = []
    for var in jaxpr.outvars[len(jaxpr.outvars) - n :]:
        if id(var) in inputs or id(var) in seen or not hasattr(var, "aval"):
            continue
        seen.add(id(var))
        kept.append(jax.ShapeDtypeStruct(var.aval.shape, var.aval.dtype))
    return kept


# ----------------------------------------------------------------------------- the planner


def _abstract_params(config: ModelConfig, module_fn: Callable[[], nnx.Module]) -> tuple:
    """`(graphdef, abstract nnx state with logical axes, pure-dict ShapeDtypeStructs)`."""
    graphdef, state = nnx.split(nnx.eval_shape(module_fn), nnx.Param)
    return graphdef, state, nnx.to_pure_dict(state)


def _cast(tree: Any, dtype: Any) -> Any:
    def cast(x: Any) -> Any:
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        return jax.ShapeDtypeStruct(x.shape, dtype if floating else x.dtype)

    return jax.tree.map(cast, tree)


def abstract_stream(
    batch: int, length: int, labels: bool = False
) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays of one training stream of `batch` rows x `length` tokens, abstract (with the
    NADO labels when `labels`)."""
    i32 = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    out = {
        "tokens_bt": i32,
        "segment_ids_bt": i32,
        "positions_bt": i32,
        "targets_bt": i32,
        "loss_mask_bt": jax.ShapeDtypeStruct((batch, length), jnp.float32),
    }
    if labels:
        vec = jax.ShapeDtypeStruct((batch,), jnp.float32)
        out |= {"labels_b": vec, "label_mask_b": vec, "importance_weight_b": vec,
                "nado_weight_b": vec}  # fmt: skip
    return out


class Planner:
    """Memory plans of one config on any mesh shape (the abstract trees are built once).

    `prefix_tokens`: special tokens the tokenizer puts before a prompt (Llama's BOS: 1), for
    the training batches' prompt width (`Experiment.prompt_len`).
    """

    def __init__(self, config: RunConfig, lm_config: ModelConfig, *, prefix_tokens: int = 1):
        """Build the abstract LLM, NADO, optimizer states and batch shapes of `config`."""
        from jaxdetox.data.packing import round_up
        from jaxdetox.models import NadoConfig
        from jaxdetox.models.nado import NadoModel
        from jaxdetox.models.registry import family_module
        from jaxdetox.pipeline.recipe import nado_optimizer_config, optimizer_config
        from jaxdetox.train.optimizer import make_optimizer

        self.config = config
        m = config.model
        self.lm_config = lm_config.replace(
            param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat_policy
        )
        cls = family_module(self.lm_config).MODEL_CLASS
        self.lm_graph, self.lm_state, self.lm_params = _abstract_params(
            self.lm_config, lambda: cls(self.lm_config, rngs=nnx.Rngs(0))
        )
        self.nado_config = NadoConfig.from_section(self.lm_config, config.nado)
        self.nado_graph, self.nado_state, self.nado_params = _abstract_params(
            self.nado_config.body, lambda: NadoModel(self.nado_config, rngs=nnx.Rngs(0))
        )
        self.lora_state = self.lora_params = None
        trained_lm = self.lm_params
        if config.finetune.lora is not None:  # the finetune stage trains adapters only
            from jaxdetox.models import lora

            lc = config.finetune.lora
            lcfg = lora.LoraConfig(lc.rank, lc.alpha, tuple(lc.targets))
            _, state, params = _abstract_params(
                self.lm_config,
                lambda: lora.add_adapters(cls(self.lm_config, rngs=nnx.Rngs(0)), lcfg),
            )
            self.lora_params = lora.split_adapters(params)[1]
            self.lora_state = nnx.filter_state(
                state, lambda path, _: str(path[-1]).endswith((lora.SUFFIX_A, lora.SUFFIX_B))
            )
            trained_lm = self.lora_params
        finetune_opt = optimizer_config(config.finetune.optimizer)
        self.lm_opt = make_optimizer(finetune_opt, 1, trained_lm)
        self.nado_opt = make_optimizer(
            nado_optimizer_config(config.train_nado), 1, self.nado_params
        )
        self.lm_opt_state = jax.eval_shape(self.lm_opt[0].init, trained_lm)
        self.nado_opt_state = jax.eval_shape(self.nado_opt[0].init, self.nado_params)
        ref_dtype = config.finetune.reference_dtype or m.param_dtype
        self.ref_params = _cast(self.lm_params, ref_dtype)
        self.prompt_len = round_up(config.prompts.max_tokens + prefix_tokens, 8)
        self.completion_len = round_up(config.sampling.max_new_tokens, 8)
        c = lm_config
        self.tensor_dims = {c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size}
        self._residuals: dict[tuple, list] = {}

    # ------------------------------------------------------------------ batches

    def finetune_streams(self) -> dict[str, tuple[int, int]]:
        """Per stream `(global rows, length)` of a finetune step."""
        cfg = self.config
        out = {"samples": (cfg.finetune.batch_size, self.prompt_len + self.completion_len)}
        if cfg.corpus is not None:
            out["corpus"] = (cfg.corpus.batch_size, cfg.corpus.seq_len)
        return out

    def nado_stream(self) -> tuple[int, int]:
        """`(global rows, length)` of a train_nado step."""
        return self.config.train_nado.batch_size, self.prompt_len + self.completion_len

    # ------------------------------------------------------------------ traced activations

    def step_config(self, stage: str) -> Any:
        """The `StepConfig` the pipeline builds for a training stage (`pipeline.recipe`)."""
        from jaxdetox.pipeline import recipe

        if stage == "train_nado":
            return recipe.nado_step_config(self.config.train_nado)
        return recipe.finetune_step_config(self.config)

    def residuals(self, stage: str, remat: bool | str) -> list[jax.ShapeDtypeStruct]:
        """Global shapes of the activations one micro-batch of `stage` keeps for backward."""
        key = (stage, remat)
        if key not in self._residuals:
            self._residuals[key] = self._trace(stage, remat)
        return self._residuals[key]

    def _trace(self, stage: str, remat: bool | str) -> list[jax.ShapeDtypeStruct]:
        from jaxdetox.models.nado import NadoModel
        from jaxdetox.models.registry import family_module
        from jaxdetox.train import steps
        from jaxdetox.train.state import Models

        lm_cfg = self.lm_config.replace(remat=remat)
        cls = family_module(lm_cfg).MODEL_CLASS
        lm_graph = nnx.split(nnx.eval_shape(lambda: cls(lm_cfg, rngs=nnx.Rngs(0))), nnx.Param)[0]
        nado_cfg = dataclasses.replace(
            self.nado_config, body=self.nado_config.body.replace(remat=remat)
        )
        nado_graph = nnx.split(
            nnx.eval_shape(lambda: NadoModel(nado_cfg, rngs=nnx.Rngs(0))), nnx.Param
        )[0]
        models = Models(lm=lm_graph, nado=nado_graph)
        config = self.step_config(stage)
        k = config.micro_batches
        if stage == "finetune":
            batch = {
                s: abstract_stream(max(b // k, 1), t)
                for s, (b, t) in self.finetune_streams().items()
            }
            denominators = {s: jnp.float32(1.0) for s in batch}
            nado_params = self.nado_params
            if config.alphas is not None:  # one NADO per constraint in the teacher
                names = tuple(f"nado{i}" for i in range(len(config.alphas)))
                models = dataclasses.replace(models, nado_names=names)
                nado_params = dict.fromkeys(names, self.nado_params)

            def loss(params: Any, batch: Any, ref: Any, nado: Any) -> Any:
                return steps.lm_loss(params, batch, models=models, ref_params=ref,
                                     nado_params=nado, config=config,
                                     denominators=denominators)[0]  # fmt: skip

            return saved_activations(loss, self.lm_params, batch, self.ref_params, nado_params)
        b, t = self.nado_stream()
        batch = {"samples": abstract_stream(max(b // k, 1), t, labels=True)}

        def nado_loss(params: Any, batch: Any, ref: Any) -> Any:
            return steps.nado_loss(params, batch, models=models, ref_params=ref, config=config,
                                   denominator=jnp.float32(1.0))[0]  # fmt: skip

        return saved_activations(nado_loss, self.nado_params, batch, self.lm_params)

    # ------------------------------------------------------------------ per mesh shape

    def _shardings(self, state: nnx.State, mesh: AbstractMesh) -> Any:
        from jaxdetox.train.state import param_shardings

        return param_shardings(state, mesh)

    def _activations(self, shapes: Iterable[Any], sizes: dict[str, int], rows: set[int]) -> float:
        return sum(activation_bytes([x], sizes, self._batch_of(x, rows), self.tensor_dims)
                   for x in shapes)  # fmt: skip

    @staticmethod
    def _batch_of(x: Any, rows: set[int]) -> int:
        return next((b for b in sorted(rows, reverse=True) if b in x.shape), -1)

    def _held(self, lm_bytes: float, nado_bytes: float) -> Row:
        # Experiment._hold keeps the base LLM and the newest LLM version, and the two newest
        # NADO versions (the parallel scheme's finetune i reads NADO_{i-1} after NADO_i).
        lms = nados = min(self.config.loop.iterations + 1, 2)
        return Row(f"held artefacts ({lms} LLM, {nados} NADO versions)",
                   lms * lm_bytes + nados * nado_bytes, held=True)  # fmt: skip

    def _training_rows(
        self, stage: str, sizes: dict[str, int], mesh: AbstractMesh
    ) -> tuple[list[Row], float, float]:
        """In-step rows of a training stage; the LLM's and the NADO's param bytes per device."""
        from jaxdetox.losses.chunked import chunk_layout
        from jaxdetox.train.state import opt_state_shardings

        cfg, c = self.config, self.lm_config
        lm_shard = self._shardings(self.lm_state, mesh)
        nado_shard = self._shardings(self.nado_state, mesh)
        lm_bytes = sharded_bytes(self.lm_params, lm_shard)
        nado_bytes = sharded_bytes(self.nado_params, nado_shard)
        step_config = self.step_config(stage)
        k = step_config.micro_batches
        accumulators = 2 if k > 1 else 1  # per-micro-batch gradients + the running sum
        if stage == "finetune":
            streams = self.finetune_streams()
            trained, params, shard, opt = "LLM", self.lm_params, lm_shard, self.lm_opt
            layers = c.num_layers
            kl = [s for s, spec in step_config.streams if spec.kl and cfg.finetune.kl_weight]
            frozen = [Row("reference LLM", sharded_bytes(self.ref_params, lm_shard)),
                      Row("NADO (frozen)", nado_bytes)]  # fmt: skip
            if self.lora_params is not None:  # LoRA: adapters train on the shared frozen base
                trained, params = "LoRA adapters", self.lora_params
                shard = self._shardings(self.lora_state, mesh)
                frozen[0] = Row("base LLM = reference (frozen, shared)", lm_bytes)
        else:
            streams = {"samples": self.nado_stream()}
            trained, params, shard, opt = "NADO", self.nado_params, nado_shard, self.nado_opt
            layers = (
                self.nado_config.body.num_layers if self.nado_config.variant == "separate" else 0
            )
            kl = ["samples"] if step_config.consistency else []
            frozen = [Row("reference LLM", lm_bytes)]
        opt_shard = opt_state_shardings(opt[0], params, shard, mesh)
        opt_state = self.lm_opt_state if stage == "finetune" else self.nado_opt_state
        rows_set = {max(b // k, 1) for b, _ in streams.values()}
        batch = sum(
            self._activations(
                jax.tree.leaves(abstract_stream(b, t, labels=s == "samples")), sizes, {b}
            )
            for s, (b, t) in streams.items()
        )
        saved = self._activations(self.residuals(stage, c.remat), sizes, rows_set)
        rows = [
            Row(f"{trained} params (trained)", sharded_bytes(params, shard)),
            Row(f"{trained} optimizer state", sharded_bytes(opt_state, opt_shard)),
            Row(
                f"{trained} gradients (float32)",
                accumulators * sharded_bytes(params, shard, jnp.float32),
            ),  # fmt: skip
            *frozen,
            Row("batch", batch),
            Row(f"activations (remat {'off' if c.remat == 'none' else 'on'})", saved),
        ]
        if layers:
            # Backward of one layer: with remat its intermediates are recomputed (and freed as
            # their gradients appear); without, gradients shaped like them are made while the
            # other layers' saved activations are still held.
            full = self._activations(self.residuals(stage, False), sizes, rows_set)
            kept = self._activations(self.residuals(stage, True), sizes, rows_set)
            name = "one layer's backward" if c.remat == "none" else "one layer recomputed (remat)"
            rows.append(Row(name, max(full - kept, 0.0) / layers))
        # The teacher's hidden states (reference, + NADO in the finetune step) per KL stream.
        n_teacher = 2 if stage == "finetune" else 1
        hidden = [
            jax.ShapeDtypeStruct(
                (max(streams[s][0] // k, 1), streams[s][1], c.hidden_size), c.dtype
            )
            for s in (kl if stage == "finetune" else list(streams))
        ]
        rows.append(Row("teacher hidden states" if stage == "finetune" else "reference hidden states",
                        n_teacher * self._activations(hidden, sizes, rows_set)))  # fmt: skip
        if kl:
            b, t = max((streams[s] for s in kl), key=lambda bt: bt[0] * bt[1])
            b = max(b // k, 1)
            steps_per_chunk, _, _ = chunk_layout(b, t, c.hidden_size, step_config.chunk_size)
            chunk = jax.ShapeDtypeStruct((b, steps_per_chunk, c.vocab_size), jnp.float32)
            blocks = KL_CHUNK_BLOCKS if stage == "finetune" else KL_CHUNK_BLOCKS - 2
            rows.append(Row("KL chunk", blocks * self._activations([chunk], sizes, {b})))
        return rows, lm_bytes, nado_bytes

    def _sampling_rows(self, sizes: dict[str, int], rows: int, new_tokens: int) -> list[Row]:
        from jaxdetox.models.cache import init_cache

        c = self.lm_config
        length = self.prompt_len + new_tokens
        cache = jax.eval_shape(lambda: init_cache(c, rows, length, c.dtype))
        kv = self._activations([cache.k, cache.v], sizes, {rows})
        layers = self.lm_params.get("layers", {})
        mesh = abstract_mesh(sizes)
        shard = self._shardings(self.lm_state, mesh)
        decode = sharded_bytes(layers, shard.get("layers", {})) if layers else 0.0
        logits = self._activations(
            [jax.ShapeDtypeStruct((rows, c.vocab_size), jnp.float32)] * 3, sizes, {rows}
        )
        return [Row("decode-form layer weights", decode), Row("KV cache", kv),
                Row("logits", logits)]  # fmt: skip

    def plan(self, sizes: dict[str, int]) -> MemoryPlan:
        """Per-device memory of every stage on a `(data, fsdp, tensor)` mesh of `sizes`."""
        sizes = {a: int(sizes[a]) for a in sharding.MESH_AXES}
        mesh = abstract_mesh(sizes)
        stages = []
        lm_bytes = nado_bytes = 0.0
        for stage in ("train_nado", "finetune"):
            rows, lm_bytes, nado_bytes = self._training_rows(stage, sizes, mesh)
            stages.append((stage, rows))
        held = self._held(lm_bytes, nado_bytes)
        s, e = self.config.sampling, self.config.eval
        sample = self._sampling_rows(sizes, s.batch_size * s.num_samples, s.max_new_tokens)
        stages.insert(0, ("sample", sample))
        if e.enabled:
            stages.append(
                ("eval", self._sampling_rows(sizes, e.batch_size * e.num_samples, e.max_new_tokens))
            )
        return MemoryPlan(sizes, tuple(StagePlan(n, (*r, held)) for n, r in stages))


# ----------------------------------------------------------------------------- reports


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def format_plan(plan: MemoryPlan, device: DeviceKind | None = None) -> str:
    """The per-device table of every stage (GiB), its peak and whether it fits `device`."""
    names: list[str] = []
    for s in plan.stages:
        names += [r.name for r in s.rows if not r.held and r.name not in names]
    held = plan.stages[0].rows[-1].name
    width = max(len(n) for n in [*names, held]) + 2
    head = "".join(f"{s.stage:>12}" for s in plan.stages)
    lines = [f"  {'GiB per device':<{width}}{head}"]
    for name in names:
        cells = []
        for s in plan.stages:
            found = [r.bytes for r in s.rows if r.name == name]
            cells.append(f"{_gib(found[0]) if found else '-':>12}")
        lines.append(f"  {name:<{width}}{''.join(cells)}")
    lines.append(f"  {'= step (jitted program)':<{width}}" + "".join(
        f"{_gib(s.step_bytes):>12}" for s in plan.stages))  # fmt: skip
    lines.append(
        f"  {held:<{width}}" + "".join(f"{_gib(s.rows[-1].bytes):>12}" for s in plan.stages)
    )
    lines.append(f"  {'= total':<{width}}" + "".join(f"{_gib(s.total):>12}" for s in plan.stages))
    peak = plan.peak
    verdict = f"peak: {peak.stage}, {_gib(peak.total)} GiB per device"
    if device is not None:
        fits = "fits" if peak.total <= device.budget else "does NOT fit"
        verdict += (f": {fits} {device.name} ({_gib(device.budget)} GiB usable = "
                    f"{device.memory / 1e9:.0f} GB x {device.usable})")  # fmt: skip
    lines.append(verdict)
    return "\n".join(lines)


def mesh_shapes(num_devices: int, max_tensor: int = 8) -> list[dict[str, int]]:
    """Every `data × fsdp × tensor = num_devices` with tensor a power of two ≤ `max_tensor`."""
    out = []
    tensor = 1
    while tensor <= min(max_tensor, num_devices):
        if num_devices % tensor == 0:
            rest = num_devices // tensor
            for fsdp in range(1, rest + 1):
                if rest % fsdp == 0:
                    out.append({"data": rest // fsdp, "fsdp": fsdp, "tensor": tensor})
        tensor *= 2
    return out


def suggest(
    planners: list[Planner], num_devices: int, device: DeviceKind, top: int = 6
) -> list[tuple[dict[str, int], list[MemoryPlan]]]:
    """Mesh shapes for `num_devices` devices of `device`, best first: the ones that fit with
    the first planner (the config as given), then by least tensor, then least fsdp (more data
    parallelism, less communication)."""
    rows = [(sizes, [p.plan(sizes) for p in planners]) for sizes in mesh_shapes(num_devices)]

    def key(item: tuple) -> tuple:
        sizes, plans = item
        fits = [pl.peak.total <= device.budget for pl in plans]
        return (not fits[0], not any(fits), sizes["tensor"], sizes["fsdp"])

    return sorted(rows, key=key)[:top]


def _verdict(plan: MemoryPlan, device: DeviceKind) -> str:
    fits = "ok" if plan.peak.total <= device.budget else "--"
    return f"{_gib(plan.peak.total)} {plan.peak.stage} {fits}"


def format_suggestions(
    rows: list[tuple[dict[str, int], list[MemoryPlan]]], labels: list[str], device: DeviceKind
) -> str:
    """The suggestion table: one line per mesh shape, peak GiB per planner variant."""
    head = "".join(f"  {label:>28}" for label in labels)
    lines = [f"  {'data':>5} {'fsdp':>5} {'tensor':>6}{head}"]
    for sizes, plans in rows:
        cells = "".join(f"  {_verdict(p, device):>28}" for p in plans)
        lines.append(f"  {sizes['data']:>5} {sizes['fsdp']:>5} {sizes['tensor']:>6}{cells}")
    return "\n".join(lines)


def local_device_kind() -> DeviceKind | None:
    """The `DeviceKind` of this machine's first device, when known (GPUs and TPUs)."""
    kind = jax.devices()[0].device_kind.lower()
    for name, pattern in (("h200-141gb", "h200"), ("h100-80gb", "h100"), ("a100-80gb", "a100-sxm4-80gb"),
                          ("a100-80gb", "a100 80gb"), ("a100-40gb", "a100"), ("l4-24gb", "l4"),
                          ("v5e", "v5 lite"), ("v5e", "v5e"), ("v5p", "v5p"), ("v6e", "v6 lite"),
                          ("v4", "tpu v4")):  # fmt: skip
        if pattern in kind:
            return DEVICE_KINDS[name]
    return None
