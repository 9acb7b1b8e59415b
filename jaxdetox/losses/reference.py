"""Full-logit reference forms of the memory-lean losses (tests and benchmarks only, small V).

Each builds the whole `[B, T, V]` logits and applies the same per-token functions as the
chunked and fused forms, which are tested against them in values and gradients. Library
code never imports this module (tests/test_imports.py).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

from jaxdetox.losses.chunked import NadoLoss, RegularizedLoss, regularized_lm_loss_terms
from jaxdetox.losses.nado import nado_bce, nado_consistency
from jaxdetox.losses.teacher import Head, Teacher, head_logits
from jaxdetox.losses.token import token_nll

__all__ = [
    "fused_lm_loss_naive",
    "naive_nll",
    "nado_losses_naive",
    "regularized_lm_loss_naive",
]


def regularized_lm_loss_naive(
    h_btd: Array,
    head: Head,
    h_ref_btd: Array,
    ref_head: Head,
    h_nado_btd: Array,
    nado_head: Head,
    targets_bt: Array,
    mask_bt: Array,
    *,
    kl_mask_bt: Array | None = None,
    alpha: float | Array = 1.0,
) -> RegularizedLoss:
    """Reference form of `regularized_lm_loss` with full `[B, T, V]` logits."""
    teacher = Teacher(h_ref_btd, ref_head, h_nado_btd, nado_head)
    return regularized_lm_loss_terms(h_btd, head, teacher, targets_bt, mask_bt, kl_mask_bt, alpha)


def fused_lm_loss_naive(
    h_btd: Array,
    head: Head,
    targets_bt: Array,
    nll_weight_bt: Array,
    *,
    kl_weight_bt: Array | None = None,
    teacher: Teacher | None = None,
    alpha: float | Array | tuple[float, ...] = 1.0,
) -> Array:
    """Reference form of `fused_lm_loss(...).loss`: Σ w·NLL + Σ k·KL with full logits, its
    gradient by autodiff (several NADOs: tuples in `teacher`, one α each)."""
    ones = jnp.ones(targets_bt.shape, bool)
    if teacher is None or kl_weight_bt is None:
        return jnp.sum(nll_weight_bt * token_nll(head_logits(h_btd, head), targets_bt, ones))
    terms = regularized_lm_loss_terms(h_btd, head, teacher, targets_bt, ones, ones, alpha)
    return jnp.sum(nll_weight_bt * terms.nll_bt) + jnp.sum(kl_weight_bt * terms.kl_bt)


def naive_nll(h_btd: Array, head: Head, targets_bt: Array, mask_bt: Array) -> Array:
    """Per-token cross-entropy with full `[B, T, V]` logits (reference for `chunked_nll`)."""
    return token_nll(head_logits(h_btd, head), targets_bt, jnp.asarray(mask_bt) != 0)


def nado_losses_naive(
    h_nado_btd: Array,
    nado_head: Head,
    h_base_btd: Array,
    base_head: Head,
    targets_bt: Array,
    labels_b: Array,
    mask_bt: Array,
    *,
    consistency: str | None = "kl",
    reverse: bool = False,
) -> NadoLoss:
    """Reference form of `nado_losses` with full `[B, T, V]` logits."""
    nado_logits = head_logits(h_nado_btd, nado_head)
    bce = nado_bce(nado_logits, targets_bt, labels_b, mask_bt)
    if consistency is None:
        return NadoLoss(bce, jnp.zeros_like(bce))
    base_logits = head_logits(h_base_btd, base_head)
    reg = nado_consistency(
        nado_logits, base_logits, targets_bt, mask_bt, kind=consistency, reverse=reverse
    )
    return NadoLoss(bce, reg)
