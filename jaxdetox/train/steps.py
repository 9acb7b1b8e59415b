"""Pure train steps `(state, batch) -> (state, metrics)` for the LLM, the NADO, and both.

The LLM objective (docs/method.md, "LLM objective"), per batch stream s (`corpus`, `samples`):

    L(θ) = Σ_s [ w_s · Σ_t m·NLL_t  +  λ · k_s · Σ_t m·KL(q_t ‖ p_θ,t) ] / Σ_t m

with q = softmax(logit_ref + α·log σ(h_φ)) the guided teacher (reference LLM ⊕ NADO,
stop-gradient) and the KL an exact sum over the vocabulary, computed in token chunks from
hidden states by `losses.fused_lm_loss` (no `[B, T, V]` tensor; its gradient is formed
in the forward pass, chunk by chunk). Each stream is a
token-weighted mean over its own loss-mask tokens, so λ weighs a KL token against an NLL
token. The NADO objective is the per-token BCE of σ(h_φ[y_t]) against the sequence label
(+ the Bellman consistency regulariser, + importance weights self-normalised per prompt), from
`losses.nado_losses`.

Batches are dicts of streams, each a dict of `[B, ...]` arrays (`tokens_bt`,
`segment_ids_bt`, `positions_bt`, `targets_bt`, `loss_mask_bt`; the samples stream also
`labels_b`, `label_mask_b`, `importance_weight_b`; any stream may carry `weight_b`, a
per-sequence weight). Gradient accumulation splits every stream into
`micro_batches` interleaved micro-batches (row r goes to micro-batch r mod k, so each
device keeps its own rows) and scans over them with float32 accumulators; the
denominators are counted over the whole batch first, so k micro-batches of b rows give the
same update as one batch of k·b rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdetox import losses
from jaxdetox.losses import Teacher
from jaxdetox.train.state import Models, ModelState, Params, TrainState, bind

F32 = jnp.float32
Batch = dict[str, dict[str, jax.Array]]
Metrics = dict[str, jax.Array]

# Keys a step reads; everything else in a host batch (texts, ids) stays on the host.
STEP_KEYS = (
    "tokens_bt",
    "segment_ids_bt",
    "positions_bt",
    "targets_bt",
    "loss_mask_bt",
    "weight_b",
    "labels_b",
    "label_mask_b",
    "importance_weight_b",
    "reward_b",  # the policy baselines (train/policy.py)
    "baseline_b",
)


@dataclasses.dataclass(frozen=True)
class StreamLoss:
    """How one batch stream enters the LLM loss: NLL weight and whether it gets the KL."""

    nll_weight: float = 0.0
    kl: bool = False


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the steps (changing one recompiles)."""

    kl_weight: float = 1.0  # λ
    alpha: float = 1.0  # guidance strength α in the teacher
    alphas: tuple[float, ...] | None = None  # several NADOs (`Models.nado_names`): α_c each
    streams: tuple[tuple[str, StreamLoss], ...] = (
        ("corpus", StreamLoss(nll_weight=1.0, kl=False)),
        ("samples", StreamLoss(nll_weight=0.0, kl=True)),
    )
    consistency: str | None = None  # NADO Bellman regulariser: None | losses.CONSISTENCY_KINDS
    consistency_weight: float = 0.0
    consistency_reverse: bool = False  # "kl": KL(Bern(s) ‖ Bern(r)) instead of KL(r ‖ s)
    importance_weights: bool = False  # the NADO's BCE weighted by `importance_weight_b`
    micro_batches: int = 1
    chunk_size: int | None = None  # tokens per chunk of the vocabulary-sized losses

    def stream(self, name: str) -> StreamLoss:
        """The loss spec of stream `name` (a stream not listed contributes nothing)."""
        return dict(self.streams).get(name, StreamLoss())

    def __post_init__(self) -> None:
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.consistency is not None and self.consistency not in losses.CONSISTENCY_KINDS:
            raise ValueError(
                f"consistency = {self.consistency!r}; expected None or one of "
                f"{losses.CONSISTENCY_KINDS}"
            )


# ----------------------------------------------------------------------------- forwards


def lm_hidden(
    graphdef: Any, params: Params, stream: dict[str, jax.Array]
) -> tuple[jax.Array, tuple[jax.Array, jax.Array | None]]:
    """Final hidden states `[B, T, D]` and the head `(w_vd, b_v)` of an LLM on a stream."""
    model = bind(graphdef, params)
    h_btd, _ = model.hidden_states(
        stream["tokens_bt"],
        positions_bt=stream["positions_bt"],
        segment_ids_bt=stream["segment_ids_bt"],
    )
    return h_btd, model.unembed_weights()


def teacher_features(
    models: Models,
    ref_params: Params,
    nado_params: Params,
    stream: dict[str, jax.Array],
    reference: tuple[jax.Array, Any] | None = None,
) -> Teacher:
    """The guided teacher's inputs on a stream: reference hidden states (frozen) and NADO
    hidden states (differentiable in φ), with their heads; `reference`: the reference's
    `(h_ref, ref_head)` on this stream, computed already (shared by two losses)."""
    if reference is None:
        ref_graph = models.lm if models.ref is None else models.ref  # LoRA: the base's graph
        h_ref, ref_head = lm_hidden(ref_graph, jax.lax.stop_gradient(ref_params), stream)
        h_ref = jax.lax.stop_gradient(h_ref)
    else:
        h_ref, ref_head = reference

    def nado_features(params: Params) -> tuple[jax.Array, Any]:
        nado = bind(models.nado, params)
        h_nado, _ = nado.hidden_states(
            stream["tokens_bt"],
            positions_bt=stream["positions_bt"],
            segment_ids_bt=stream["segment_ids_bt"],
            lm_hidden_btd=h_ref,  # the shared variant's features; ignored by a separate body
        )
        return h_nado, nado.unembed_weights()

    if models.nado_names is None:
        h_nado, nado_head = nado_features(nado_params)
        return Teacher(h_ref=h_ref, ref_head=ref_head, h_nado=h_nado, nado_head=nado_head)
    # Several constraints: one NADO each, `nado_params[name]` (log q sums their log σ terms).
    feats = [nado_features(nado_params[name]) for name in models.nado_names]
    return Teacher(
        h_ref=h_ref,
        ref_head=ref_head,
        h_nado=tuple(h for h, _ in feats),
        nado_head=tuple(head for _, head in feats),
    )


def _sequence_weights(stream: dict[str, jax.Array]) -> jax.Array:
    mask = stream["loss_mask_bt"].astype(F32)
    if "weight_b" in stream:
        mask = mask * stream["weight_b"].astype(F32)[:, None]
    return mask


# ----------------------------------------------------------------------------- loss sums


def lm_sums(
    models: Models,
    lm_params: Params,
    stream: dict[str, jax.Array],
    teacher: Teacher | None,
    config: StepConfig,
    nll_scale: float | jax.Array,
    kl_scale: float | jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(loss, Σ m·NLL, Σ m·KL)` of a stream: loss = nll_scale·Σ m·NLL + kl_scale·Σ m·KL.

    The loss comes from `losses.fused_lm_loss`, which forms its gradient in the forward pass
    (3 vocabulary-row matmuls per chunk instead of 6 under a checkpoint); the two sums are
    metrics (KL = 0 without a teacher).
    """
    h_btd, head = lm_hidden(models.lm, lm_params, stream)
    w_bt = _sequence_weights(stream)
    out = losses.fused_lm_loss(  # stop-gradient on the teacher
        h_btd, head, stream["targets_bt"], nll_scale * w_bt,
        kl_weight_bt=None if teacher is None else kl_scale * w_bt,
        teacher=teacher,
        alpha=config.alphas or config.alpha, chunk_size=config.chunk_size,
    )  # fmt: skip
    terms = jax.lax.stop_gradient((out.nll_bt, out.kl_bt))
    return out.loss, jnp.sum(terms[0] * w_bt), jnp.sum(terms[1] * w_bt)


def nado_weights(stream: dict[str, jax.Array], config: StepConfig) -> jax.Array:
    """Per-sequence NADO weights `[B]`: label mask × (when configured) the batch's
    `importance_weight_b`, the importance weights p(y)/π(y) self-normalised per prompt over
    the whole iteration on the host (`data.store_batches.per_prompt_importance_weights`):
    a batch mixes prompts and holds only some of a prompt's samples, so it cannot."""
    label_mask = stream["label_mask_b"].astype(F32)
    if not config.importance_weights:
        return label_mask
    return label_mask * stream["importance_weight_b"].astype(F32)


def nado_sums(teacher: Teacher, stream: dict[str, jax.Array], config: StepConfig) -> tuple:
    """Weighted sums Σ w·BCE and Σ w·consistency over a stream's labelled completions."""
    w_b = stream["nado_weight_b"]
    mask_bt = stream["loss_mask_bt"] * (w_b > 0)[:, None]
    terms = losses.nado_losses(
        teacher.h_nado, teacher.nado_head, teacher.h_ref, teacher.ref_head,
        stream["targets_bt"], stream["labels_b"], mask_bt,
        consistency=config.consistency, reverse=config.consistency_reverse,
        chunk_size=config.chunk_size,
    )  # fmt: skip
    w_bt = w_b[:, None] * mask_bt
    return jnp.sum(terms.bce_bt * w_bt), jnp.sum(terms.consistency_bt * w_bt)


# ----------------------------------------------------------------------------- denominators


def loss_denominator(x: jax.Array) -> jax.Array:
    """The denominator of a masked mean over the whole batch: Σ x, at least 1."""
    return jnp.maximum(jnp.sum(x.astype(F32)), 1.0)


def _lm_streams(batch: Batch, config: StepConfig) -> list[str]:
    return [s for s in batch if s in dict(config.streams)]


def lm_denominators(batch: Batch, config: StepConfig) -> dict[str, jax.Array]:
    """Loss-mask tokens per LLM stream over the whole (global) batch."""
    return {
        s: loss_denominator(_sequence_weights(batch[s]) > 0) for s in _lm_streams(batch, config)
    }


def nado_denominator(stream: dict[str, jax.Array]) -> jax.Array:
    """Labelled completion tokens of the samples stream over the whole batch."""
    return loss_denominator(stream["loss_mask_bt"] * (stream["nado_weight_b"] > 0)[:, None])


# ----------------------------------------------------------------------------- losses


def lm_loss(
    lm_params: Params,
    batch: Batch,
    *,
    models: Models,
    ref_params: Params | None,
    nado_params: Params | None,
    config: StepConfig,
    denominators: dict[str, jax.Array],
    teachers: dict[str, Teacher] | None = None,
) -> tuple[jax.Array, Metrics]:
    """The LLM loss of one (micro-)batch, normalised by whole-batch denominators."""
    total, sums = jnp.zeros((), F32), {}
    for name in _lm_streams(batch, config):
        spec = config.stream(name)
        teacher = None
        if spec.kl and config.kl_weight != 0:
            teacher = (teachers or {}).get(name)
            if teacher is None:
                teacher = teacher_features(models, ref_params, nado_params, batch[name])
        n = denominators[name]
        loss, nll, kl = lm_sums(
            models, lm_params, batch[name], teacher, config,
            spec.nll_weight / n, config.kl_weight / n,
        )  # fmt: skip
        total = total + loss
        sums[f"lm/{name}/nll_sum"], sums[f"lm/{name}/kl_sum"] = nll, kl
    return total, sums


def nado_loss(
    nado_params: Params,
    batch: Batch,
    *,
    models: Models,
    ref_params: Params,
    config: StepConfig,
    denominator: jax.Array,
) -> tuple[jax.Array, tuple[Metrics, Teacher]]:
    """The NADO loss of one (micro-)batch on its samples stream, plus the teacher features."""
    stream = batch["samples"]
    teacher = teacher_features(models, ref_params, nado_params, stream)
    bce, consistency = nado_sums(teacher, stream, config)
    loss = (bce + config.consistency_weight * consistency) / denominator
    return loss, ({"nado/bce_sum": bce, "nado/consistency_sum": consistency}, teacher)


# ----------------------------------------------------------------------------- accumulation


def _micro_batches(batch: Any, k: int) -> Any:
    """`[B, ...]` -> `[k, B/k, ...]`, micro-batch i = rows i, i+k, ... (stays device-local)."""

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by micro_batches={k}")
        return jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0)

    return jax.tree.map(split, batch)


def accumulate_gradients(
    loss_fn: Callable[[Any, Any], tuple[jax.Array, Metrics]],
    params: Any,
    batch: Any,
    micro_batches: int,
    trainable: Any = None,
) -> tuple[Any, Metrics]:
    """Gradients (float32) and summed aux metrics of `loss_fn(params, batch)` over micro-batches.

    `trainable` (bool pytree like `params`) zeroes frozen gradients so XLA drops their work.
    """

    def grads_of(mb: Any) -> tuple[Any, Metrics]:
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
        g = jax.tree.map(lambda x: x.astype(F32), g)
        if trainable is not None:
            g = jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), g, trainable)
        return g, {**aux, "loss": loss}

    if micro_batches == 1:
        return grads_of(batch)
    micro = _micro_batches(batch, micro_batches)
    zeros = jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], micro))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)

    def body(acc: Any, mb: Any) -> tuple[Any, None]:
        return jax.tree.map(jnp.add, acc, grads_of(mb)), None

    out, _ = jax.lax.scan(body, init, micro)
    return out


def _trainable_norm(grads: Any, trainable: Any) -> jax.Array:
    if trainable is not None:
        grads = jax.tree.map(lambda g, m: g if m else jnp.zeros((), g.dtype), grads, trainable)
    return optax.global_norm(grads)


def apply_gradients(
    model: ModelState, grads: Params, optimizer: optax.GradientTransformation
) -> ModelState:
    """One optimizer update of a `ModelState`."""
    updates, opt_state = optimizer.update(grads, model.opt_state, model.params)
    params = optax.apply_updates(model.params, updates)
    return ModelState(model.step + 1, params, opt_state)


def _with_nado_weights(batch: Batch, config: StepConfig) -> Batch:
    samples = dict(batch["samples"])
    samples["nado_weight_b"] = nado_weights(samples, config)
    return {**batch, "samples": samples}


def _lm_metrics(sums: Metrics, denominators: dict[str, jax.Array]) -> Metrics:
    out = {}
    for name, n in denominators.items():
        out[f"lm/{name}/nll"] = sums[f"lm/{name}/nll_sum"] / n
        out[f"lm/{name}/kl"] = sums[f"lm/{name}/kl_sum"] / n
        out[f"lm/{name}/tokens"] = n
    return out


# ----------------------------------------------------------------------------- steps


def lm_step(
    state: TrainState, batch: Batch, *, models: Models, config: StepConfig
) -> tuple[TrainState, Metrics]:
    """One LLM update: NLL on its streams + λ·KL to the guided teacher (NADO frozen)."""
    denominators = lm_denominators(batch, config)
    teacher_nado = state.teacher_nado
    nado_params = None if teacher_nado is None else jax.lax.stop_gradient(teacher_nado)

    def loss_fn(params: Params, mb: Batch) -> tuple[jax.Array, Metrics]:
        return lm_loss(
            models.student_params(params, state.ref_params), mb, models=models, ref_params=state.ref_params, nado_params=nado_params,
            config=config, denominators=denominators,
        )  # fmt: skip

    state, metrics, _ = update_lm(state, models, loss_fn, batch, config.micro_batches, denominators)
    return state, metrics


def update_lm(
    state: TrainState,
    models: Models,
    loss_fn: Callable[[Params, Batch], tuple[jax.Array, Metrics]],
    batch: Batch,
    micro_batches: int,
    denominators: dict[str, jax.Array],
) -> tuple[TrainState, Metrics, Metrics]:
    """Accumulate the LLM's gradients of `loss_fn` and apply them: `(state, metrics, summed
    aux)`; the metrics are the per-stream NLL / KL, loss, gradient norm and learning rate."""
    trainable = models.lm_trainable
    grads, sums = accumulate_gradients(loss_fn, state.lm.params, batch, micro_batches, trainable)
    metrics = {
        **_lm_metrics(sums, denominators),
        "lm/loss": sums["loss"],
        "lm/grad_norm": _trainable_norm(grads, trainable),
        "lm/learning_rate": jnp.asarray(models.lm_schedule(state.lm.step), F32),
    }
    lm = apply_gradients(state.lm, grads, models.lm_optimizer)
    return state.replace(lm=lm), metrics, sums


def sft_step(
    state: TrainState, batch: Batch, *, models: Models, config: StepConfig
) -> tuple[TrainState, Metrics]:
    """Plain fine-tuning (λ = 0): the NLL of `lm_step` without any teacher."""
    config = dataclasses.replace(config, kl_weight=0.0)
    return lm_step(state, batch, models=models, config=config)


def nado_step(
    state: TrainState, batch: Batch, *, models: Models, config: StepConfig
) -> tuple[TrainState, Metrics]:
    """One NADO update on labelled samples (BCE + consistency; the LLMs frozen)."""
    batch = _with_nado_weights(batch, config)
    denominator = nado_denominator(batch["samples"])

    def loss_fn(params: Params, mb: Batch) -> tuple[jax.Array, Metrics]:
        loss, (sums, _) = nado_loss(
            params, mb, models=models, ref_params=state.nado_reference, config=config,
            denominator=denominator,
        )  # fmt: skip
        return loss, sums

    trainable = models.nado_trainable
    grads, sums = accumulate_gradients(
        loss_fn, state.nado.params, batch, config.micro_batches, trainable
    )
    metrics = _nado_metrics(sums, denominator, grads, trainable, models, state)
    return state.replace(nado=apply_gradients(state.nado, grads, models.nado_optimizer)), metrics


def _nado_metrics(
    sums: Metrics,
    denominator: jax.Array,
    grads: Params,
    trainable: Any,
    models: Models,
    state: TrainState,
) -> Metrics:
    return {
        "nado/bce": sums["nado/bce_sum"] / denominator,
        "nado/consistency": sums["nado/consistency_sum"] / denominator,
        "nado/loss": sums["loss"],
        "nado/tokens": denominator,
        "nado/grad_norm": _trainable_norm(grads, trainable),
        "nado/learning_rate": jnp.asarray(models.nado_schedule(state.nado.step), F32),
    }


def joint_step(
    state: TrainState,
    batch: Batch,
    *,
    models: Models,
    config: StepConfig,
) -> tuple[TrainState, Metrics]:
    """The LLM and the NADO updated together (the parallel scheme's step).

    The LLM's teacher uses the NADO *before* this update (stop-gradient), and on the samples
    stream the reference and NADO forwards are shared by both losses: the LLM half equals
    `lm_step` and the NADO half equals `nado_step` on the same batch. A teacher NADO of its
    own (`state.teacher_nado_params`: the pipeline's NADO_{i−1} while NADO_i trains) runs
    its own forward, sharing the reference's; a NADO reference of its own
    (`state.nado_ref_params`) leaves the LLM half's teacher entirely its own.
    """
    batch = _with_nado_weights(batch, config)
    lm_denoms = lm_denominators(batch, config)
    nado_denom = nado_denominator(batch["samples"])
    frozen_nado = jax.lax.stop_gradient(state.teacher_nado)
    same_ref, same_nado = state.nado_ref_params is None, state.teacher_nado_params is None

    def lm_teachers(teacher: Teacher, mb: Batch) -> dict[str, Teacher] | None:
        if same_ref and same_nado:  # one teacher for both losses
            return {"samples": teacher}
        if same_ref:  # the reference's forward is shared, the teacher NADO's is its own
            reference = (teacher.h_ref, teacher.ref_head)
            return {
                "samples": teacher_features(models, None, frozen_nado, mb["samples"], reference)
            }
        return None

    def loss_fn(params: tuple[Params, Params], mb: Batch) -> tuple[jax.Array, Metrics]:
        lm_params, nado_params = params
        n_loss, (n_sums, teacher) = nado_loss(
            nado_params, mb, models=models, ref_params=state.nado_reference, config=config,
            denominator=nado_denom,
        )  # fmt: skip
        l_loss, l_sums = lm_loss(
            models.student_params(lm_params, state.ref_params), mb, models=models, ref_params=state.ref_params, nado_params=frozen_nado,
            config=config, denominators=lm_denoms, teachers=lm_teachers(teacher, mb),
        )  # fmt: skip
        return l_loss + n_loss, {**l_sums, **n_sums, "lm_loss": l_loss, "nado_loss": n_loss}

    trainable, nado_trainable = models.lm_trainable, models.nado_trainable
    mask = None if trainable is None or nado_trainable is None else (trainable, nado_trainable)
    (lm_grads, nado_grads), sums = accumulate_gradients(
        loss_fn, (state.lm.params, state.nado.params), batch, config.micro_batches, mask
    )
    lm_metrics = {
        **_lm_metrics(sums, lm_denoms),
        "lm/loss": sums["lm_loss"],
        "lm/grad_norm": _trainable_norm(lm_grads, trainable),
        "lm/learning_rate": jnp.asarray(models.lm_schedule(state.lm.step), F32),
    }
    nado_metrics = _nado_metrics(
        {**sums, "loss": sums["nado_loss"]}, nado_denom, nado_grads, nado_trainable, models, state
    )
    state = state.replace(
        lm=apply_gradients(state.lm, lm_grads, models.lm_optimizer),
        nado=apply_gradients(state.nado, nado_grads, models.nado_optimizer),
    )
    return state, {**lm_metrics, **nado_metrics}
