"""Losses that train the NADO auxiliary model R_φ (docs/method.md).

Array convention ("next-token aligned", the same as `token_nll`): position `t` of
`logits_btv` is the model output after reading the prefix `y_≤t`, and `targets_bt[:, t]` is
the token that follows it. So for a NADO with vocabulary head `h`,
`σ(nado_logits_btv[b, t, v]) = R_φ(x, y_≤t ∘ v)` and the realised next token is
`targets_bt[b, t]`. `mask_bt` is non-zero at positions whose target is a generated token.

Sequence labels C(x, y) (soft `1 − tox^τ` or thresholded) come from
`jaxdetox.oracles.make_labels(toxicity, ok, tau=..., threshold=...)`, which also masks
oracle failures; pass its mask on as sample weights / `mask_bt`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import Array

from jaxdetox.losses.token import apply_mask, log_softmax, upcast

__all__ = [
    "CONSISTENCY_KINDS",
    "bce_of_selected",
    "bernoulli_kl",
    "consistency_of",
    "nado_bce",
    "nado_consistency",
    "one_step_expectation",
    "select_logits",
    "self_normalized_weights",
    "tempered_importance_weights",
]

CONSISTENCY_KINDS = ("kl", "squared", "ratio")


def select_logits(logits_btv: Array, targets_bt: Array, mask_bt: Array | None = None) -> Array:
    """Gathers `logits_btv[..., targets_bt]` (targets at masked positions may be anything)."""
    if logits_btv.shape[:-1] != targets_bt.shape:
        raise ValueError(
            f"select_logits: logits {logits_btv.shape} need targets of shape "
            f"{logits_btv.shape[:-1]}, got {targets_bt.shape}"
        )
    if mask_bt is not None:
        targets_bt = jnp.where(jnp.asarray(mask_bt) != 0, targets_bt, 0)
    idx = jnp.asarray(targets_bt)[..., None].astype(jnp.int32)
    return upcast(jnp.take_along_axis(logits_btv, idx, axis=-1)[..., 0])


def nado_bce(nado_logits_btv: Array, targets_bt: Array, labels_b: Array, mask_bt: Array) -> Array:
    """Per-token BCE of σ(h(x, y_≤t)[y_t+1]) against the sequence label C(x, y) → [B, T]."""
    labels_b = upcast(labels_b)
    if labels_b.shape != targets_bt.shape[:-1]:
        raise ValueError(
            f"nado_bce: labels_b must have one label per sequence, shape "
            f"{targets_bt.shape[:-1]}, got {labels_b.shape}"
        )
    logit_bt = select_logits(nado_logits_btv, targets_bt, mask_bt)
    return bce_of_selected(logit_bt, jnp.broadcast_to(labels_b[..., None], logit_bt.shape), mask_bt)


def bce_of_selected(logit_bt: Array, labels_bt: Array, mask_bt: Array) -> Array:
    """Masked BCE-with-logits of already selected NADO logits h[y_t+1] against labels."""
    # Every generated position regresses on the same sequence-level label: its minimiser is
    # E[C | prefix] = R(x, y_≤t+1) under the sampling distribution (docs/method.md).
    bce_bt = optax.sigmoid_binary_cross_entropy(upcast(logit_bt), upcast(labels_bt))
    return apply_mask(bce_bt, mask_bt)


def one_step_expectation(base_logits_btv: Array, nado_logits_btv: Array) -> tuple[Array, Array]:
    """(log s, log(1 − s)) with s = Σ_v p(v|·)·σ(h[v]), computed in log space → two [B, T]."""
    log_p = log_softmax(base_logits_btv)
    h = upcast(nado_logits_btv)
    # 1 − s = Σ_v p(v)·σ(−h[v]) because Σ_v p(v) = 1: both sides stay accurate near 0 and 1.
    log_s = jax.nn.logsumexp(log_p + jax.nn.log_sigmoid(h), axis=-1)
    log_1ms = jax.nn.logsumexp(log_p + jax.nn.log_sigmoid(-h), axis=-1)
    return log_s, log_1ms


def bernoulli_kl(log_a: Array, log_1ma: Array, log_b: Array, log_1mb: Array) -> Array:
    """KL(Bern(a) ‖ Bern(b)) from the logs of a, 1−a, b, 1−b (0·log 0 = 0, no NaN gradients)."""

    def term(log_x: Array, log_y: Array) -> Array:
        x = jnp.exp(log_x)
        return x * jnp.where(x > 0, log_x - log_y, 0.0)

    return term(log_a, log_b) + term(log_1ma, log_1mb)


def nado_consistency(
    nado_logits_btv: Array,
    base_logits_btv: Array,
    targets_bt: Array,
    mask_bt: Array,
    *,
    kind: str = "kl",
    reverse: bool = False,
) -> Array:
    """Bellman consistency between r_t = σ(h(y_≤t)[y_t+1]) and s_t+1 = Σ_v p(v|y_≤t+1)·σ(h(y_≤t+1)[v]).

    Both are estimates of R(x, y_≤t+1); at the exact R they are equal (Bellman equation,
    docs/method.md). `kind`: "kl" = KL(Bern(r) ‖ Bern(s)) (the MT code; `reverse=True` gives
    KL(Bern(s) ‖ Bern(r)) as in the LCG code), "squared" = (r − s)², "ratio" = (s/r − 1)².
    The base LM is frozen (stop-gradient); gradients reach both NADO sides. Returns [B, T],
    zero at the last position and wherever position t or t+1 is masked (a finished sequence
    has R = C, which the BCE already fits).
    """
    if kind not in CONSISTENCY_KINDS:
        raise ValueError(f"nado_consistency: kind must be one of {CONSISTENCY_KINDS}, got {kind!r}")
    if nado_logits_btv.shape != base_logits_btv.shape:
        raise ValueError(
            f"nado_consistency: nado_logits {nado_logits_btv.shape} and base_logits "
            f"{base_logits_btv.shape} must have the same [B, T, V] shape"
        )
    base_logits_btv = jax.lax.stop_gradient(base_logits_btv)
    r_logit = select_logits(nado_logits_btv, targets_bt, mask_bt)[..., :-1]
    log_s, log_1ms = one_step_expectation(base_logits_btv[..., 1:, :], nado_logits_btv[..., 1:, :])
    mask = jnp.asarray(mask_bt) != 0
    reg = consistency_of(r_logit, log_s, log_1ms, mask[..., :-1] & mask[..., 1:], kind, reverse)
    return jnp.concatenate([reg, jnp.zeros_like(reg[..., :1])], axis=-1)


def consistency_of(
    r_logit: Array, log_s: Array, log_1ms: Array, mask: Array, kind: str, reverse: bool
) -> Array:
    """Elementwise regulariser between r = σ(r_logit) and s (given as log s, log(1 − s))."""
    if kind not in CONSISTENCY_KINDS:
        raise ValueError(f"nado consistency: kind must be one of {CONSISTENCY_KINDS}, got {kind!r}")
    log_r, log_1mr = jax.nn.log_sigmoid(r_logit), jax.nn.log_sigmoid(-r_logit)
    if kind == "kl":
        if reverse:
            reg = bernoulli_kl(log_s, log_1ms, log_r, log_1mr)
        else:
            reg = bernoulli_kl(log_r, log_1mr, log_s, log_1ms)
    elif kind == "squared":
        reg = (jnp.exp(log_r) - jnp.exp(log_s)) ** 2
    else:  # "ratio": (s/r − 1)²
        reg = jnp.expm1(log_s - log_r) ** 2
    return apply_mask(reg, mask)


def self_normalized_weights(
    log_target: Array, log_proposal: Array, mask: Array | None = None
) -> Array:
    """Self-normalised importance weights softmax(log p − log q) over the last (sample) axis.

    Weights sum to 1 over the unmasked samples of each group (pass `[prompts, samples]` to
    normalise per prompt); masked samples get exactly 0. Constants: no gradient flows.
    """
    log_w = upcast(log_target) - upcast(log_proposal)
    if mask is not None:
        log_w = jnp.where(jnp.asarray(mask) != 0, log_w, -jnp.inf)
    return jax.lax.stop_gradient(jnp.exp(log_softmax(log_w)))


def tempered_importance_weights(
    log_p: Array, exponent: float | Array, mask: Array | None = None
) -> Array:
    """Weights softmax((1 − T)·log p(y)) for samples from a sequence-level proposal ∝ p(y)^T.

    Token-by-token temperature sampling (softmax(logits/τ)) is *not* ∝ p(y)^(1/τ) because
    each prefix renormalises; for it use `self_normalized_weights(log p(y), log q(y))` with
    the proposal's own sequence log-probability.
    """
    log_p = upcast(log_p)
    return self_normalized_weights((1.0 - exponent) * log_p, jnp.zeros_like(log_p), mask)
