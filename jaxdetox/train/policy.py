"""Pure train steps of the policy baselines: REINFORCE and DPO on the LLM's own samples.

Each is `(state, batch) -> (state, metrics)` like `steps.lm_step`, reuses its gradient
accumulation and optimizer update (`steps.update_lm`) and (optionally) its corpus NLL term, and differs only in
the loss (`losses.reinforce_loss`, `losses.dpo_loss`; docs/baselines.md):

- `reinforce_step`, batch stream `samples` with `reward_b` (oracle reward), `baseline_b`
  (the moving-average baseline, made on the host) and `label_mask_b` (1 = a scored row);
  with `kl_coef` > 0 the frozen reference (`state.ref_params`) gives the sampled KL penalty.
- `dpo_step`, streams `chosen` and `rejected` whose row b is one pair (same prompt),
  `label_mask_b` on `chosen` marking real pairs; the reference is `state.ref_params`.

Sequence log-probs come from hidden states in token chunks (`losses.chunked_nll`), so no
`[B, T, V]` tensor is formed. Per-sequence terms are summed and divided by the number of
sequences (pairs) in the whole batch, so micro-batching gives the same update.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxdetox import losses
from jaxdetox.train.state import Models, Params, TrainState
from jaxdetox.train.steps import (
    F32,
    Batch,
    Metrics,
    StepConfig,
    StreamLoss,
    lm_denominators,
    lm_hidden,
    lm_loss,
    loss_denominator,
    update_lm,
)


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Static settings of the policy steps (changing one recompiles)."""

    kl_coef: float = 0.0  # REINFORCE: β of the sampled KL(π_θ ‖ π_ref) penalty
    beta: float = 0.1  # DPO: β
    corpus_nll_weight: float = 1.0  # weight of the corpus NLL when a `corpus` stream is given
    micro_batches: int = 1
    chunk_size: int | None = None

    def corpus(self) -> StepConfig:
        """The `lm_loss` config of the corpus NLL term (no KL)."""
        return StepConfig(
            kl_weight=0.0,
            streams=(("corpus", StreamLoss(nll_weight=self.corpus_nll_weight)),),
            micro_batches=self.micro_batches,
            chunk_size=self.chunk_size,
        )


def sequence_logprobs(
    graphdef: Any, params: Params, stream: dict[str, jax.Array], chunk_size: int | None = None
) -> jax.Array:
    """`[B]` log π(completion | prompt) = Σ_t m·log π(y_t+1 | y_≤t) of an LLM on a stream."""
    h_btd, head = lm_hidden(graphdef, params, stream)
    mask = stream["loss_mask_bt"]
    nll_bt = losses.chunked_nll(h_btd, head, stream["targets_bt"], mask, chunk_size=chunk_size)
    return -jnp.sum(nll_bt * mask.astype(F32), axis=1)


def _prologue(batch: Batch, stream: str, config: PolicyConfig) -> tuple:
    """`(number of sequences / pairs, corpus StepConfig, corpus denominators)` of a batch."""
    n = loss_denominator(batch[stream]["label_mask_b"].astype(F32))
    corpus = config.corpus()
    return n, corpus, lm_denominators(batch, corpus)


def _corpus_loss(
    params: Params, mb: Batch, models: Models, corpus: StepConfig, denominators: dict
) -> tuple[jax.Array, Metrics]:
    """The corpus NLL term (0 without a `corpus` stream) and its sums."""
    return lm_loss(
        params, mb, models=models, ref_params=None, nado_params=None, config=corpus,
        denominators=denominators,
    )  # fmt: skip


def _means(sums: Metrics, n: jax.Array, prefix: str, names: tuple[str, ...]) -> Metrics:
    """`{prefix/name: sums[name_sum] / n}`: per-sequence (per-pair) means of summed aux."""
    return {f"{prefix}/{k}": sums[f"{k}_sum"] / n for k in names}


def reinforce_step(
    state: TrainState, batch: Batch, *, models: Models, config: PolicyConfig
) -> tuple[TrainState, Metrics]:
    """One REINFORCE update on sampled completions (+ the corpus NLL when given)."""
    n_seq, corpus, denominators = _prologue(batch, "samples", config)
    use_kl = config.kl_coef != 0 and state.ref_params is not None

    def loss_fn(params: Params, mb: Batch) -> tuple[jax.Array, Metrics]:
        s = mb["samples"]
        m = s["label_mask_b"].astype(F32)
        logprob_b = sequence_logprobs(models.lm, params, s, config.chunk_size)
        kl_b = None
        if use_kl:
            ref = jax.lax.stop_gradient(state.ref_params)
            ref_b = sequence_logprobs(models.lm, ref, s, config.chunk_size)
            kl_b = jax.lax.stop_gradient(logprob_b - ref_b)
        terms = losses.reinforce_loss(
            logprob_b, s["reward_b"], s["baseline_b"], m, kl_b=kl_b, kl_coef=config.kl_coef
        )
        policy = jnp.sum(terms.loss_b) / n_seq
        corpus_loss, sums = _corpus_loss(params, mb, models, corpus, denominators)
        aux = {
            **sums,
            "lm/reinforce/loss": policy,
            "reward_sum": jnp.sum(m * s["reward_b"]),
            "advantage_sum": jnp.sum(terms.advantage_b),
            "logprob_sum": jnp.sum(m * jax.lax.stop_gradient(logprob_b)),
            "kl_sum": jnp.zeros((), F32) if kl_b is None else jnp.sum(m * kl_b),
        }
        return policy + corpus_loss, aux

    state, metrics, sums = update_lm(
        state, models, loss_fn, batch, config.micro_batches, denominators
    )
    metrics |= _means(sums, n_seq, "lm/reinforce", ("reward", "advantage", "logprob", "kl"))
    metrics["lm/reinforce/loss"] = sums["lm/reinforce/loss"]
    metrics["lm/reinforce/baseline"] = jnp.max(batch["samples"]["baseline_b"])
    return state, metrics


def dpo_step(
    state: TrainState, batch: Batch, *, models: Models, config: PolicyConfig
) -> tuple[TrainState, Metrics]:
    """One DPO update on (chosen, rejected) pairs of own samples (+ the corpus NLL)."""
    n_pairs, corpus, denominators = _prologue(batch, "chosen", config)
    ref = jax.lax.stop_gradient(state.ref_params)

    def loss_fn(params: Params, mb: Batch) -> tuple[jax.Array, Metrics]:
        chosen, rejected = mb["chosen"], mb["rejected"]
        m = chosen["label_mask_b"].astype(F32)
        logps = [
            sequence_logprobs(models.lm, p, s, config.chunk_size)
            for p, s in ((params, chosen), (params, rejected), (ref, chosen), (ref, rejected))
        ]
        terms = losses.dpo_loss(*logps, config.beta, m)
        dpo = jnp.sum(terms.loss_b) / n_pairs
        corpus_loss, sums = _corpus_loss(params, mb, models, corpus, denominators)
        margin = jax.lax.stop_gradient(terms.margin_b)
        aux = {
            **sums,
            "lm/dpo/loss": dpo,
            "margin_sum": jnp.sum(m * margin),
            "accuracy_sum": jnp.sum(m * (margin > 0)),
        }
        return dpo + corpus_loss, aux

    state, metrics, sums = update_lm(
        state, models, loss_fn, batch, config.micro_batches, denominators
    )
    metrics |= _means(sums, n_pairs, "lm/dpo", ("margin", "accuracy"))
    return state, metrics | {"lm/dpo/loss": sums["lm/dpo/loss"], "lm/dpo/pairs": n_pairs}
