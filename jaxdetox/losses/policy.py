"""Sequence-level losses of the policy baselines (docs/baselines.md): REINFORCE and DPO.

Both work on *sequence* log-probabilities `log π(y|x) = Σ_t log π(y_t | x, y_<t)` over a
completion's tokens (the caller sums per-token log-probs under its loss mask) and return
one loss term per sequence, so a step can normalise by a whole-batch count and accumulate
over micro-batches. Everything is computed in (at least) float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from jaxdetox.losses.token import upcast

__all__ = ["DpoTerms", "ReinforceTerms", "dpo_loss", "moving_average", "reinforce_loss"]


class ReinforceTerms(NamedTuple):
    """Per-sequence REINFORCE loss (differentiable in `logprob_b`) and its advantage."""

    loss_b: Array
    advantage_b: Array


class DpoTerms(NamedTuple):
    """Per-pair DPO loss (differentiable in the policy log-probs) and the implicit margin."""

    loss_b: Array
    margin_b: Array


def reinforce_loss(
    logprob_b: Array,
    reward_b: Array,
    baseline: Array | float,
    mask_b: Array,
    *,
    kl_b: Array | None = None,
    kl_coef: float = 0.0,
) -> ReinforceTerms:
    """Score-function (REINFORCE) loss per sampled sequence, to be minimised:

        loss_b = −A_b · log π_θ(y_b),   A_b = r_b − b − β·KL̂_b     (A_b stop-gradient)

    with `b` a baseline (any value independent of y_b keeps the gradient unbiased) and
    KL̂_b = log π_θ(y_b) − log π_ref(y_b) the one-sample estimate of KL(π_θ ‖ π_ref): its
    score-function gradient E[KL̂·∇log π_θ] is the KL's gradient, so it enters as a reward
    penalty (as in KL-regularised policy-gradient fine-tuning). Rows with `mask_b` = 0 give 0.
    """
    logprob_b, reward_b = upcast(logprob_b), upcast(reward_b)
    advantage_b = reward_b - upcast(baseline)
    if kl_b is not None and kl_coef:
        advantage_b = advantage_b - kl_coef * upcast(kl_b)
    advantage_b = jax.lax.stop_gradient(jnp.where(mask_b != 0, advantage_b, 0.0))
    loss_b = jnp.where(mask_b != 0, -advantage_b * logprob_b, 0.0)
    return ReinforceTerms(loss_b, advantage_b)


def dpo_loss(
    policy_chosen_b: Array,
    policy_rejected_b: Array,
    reference_chosen_b: Array,
    reference_rejected_b: Array,
    beta: float,
    mask_b: Array,
) -> DpoTerms:
    """Direct preference optimisation (Rafailov et al. 2023) per pair (y_w ≻ y_l):

        m_b    = [log π_θ(y_w) − log π_ref(y_w)] − [log π_θ(y_l) − log π_ref(y_l)]
        loss_b = −log σ(β · m_b) = softplus(−β · m_b)

    The reference log-probs are constants (stop-gradient). Rows with `mask_b` = 0 give 0.
    """
    ref_w = jax.lax.stop_gradient(upcast(reference_chosen_b))
    ref_l = jax.lax.stop_gradient(upcast(reference_rejected_b))
    margin_b = (upcast(policy_chosen_b) - ref_w) - (upcast(policy_rejected_b) - ref_l)
    loss_b = jnp.where(mask_b != 0, jax.nn.softplus(-beta * margin_b), 0.0)
    return DpoTerms(loss_b, jnp.where(mask_b != 0, margin_b, 0.0))


def moving_average(previous: float | None, value: float, momentum: float) -> float:
    """Exponential moving average `m·previous + (1 − m)·value` (the first value as it is)."""
    if previous is None:
        return float(value)
    return float(momentum * previous + (1.0 - momentum) * value)
