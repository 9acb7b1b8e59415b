"""Token-level losses over the whole vocabulary: NLL, guided teacher, closed-form KL.

Conventions shared by every function here (docs/method.md, docs/interfaces.md):
- the last axis is the vocabulary; any leading axes (`[B, T]`, `[N]`, ...) are kept;
- computation is at least float32 (bf16 inputs are upcast; float64 stays float64 so the
  exactness tests can run under `jax.experimental.enable_x64`);
- outputs are per position; a `mask` (non-zero = counted) zeroes the other positions with
  `where`, so garbage in padded rows (NaN, -inf) never leaks into values or gradients;
- a logit of `-inf` means "impossible token" (masked vocabulary): it contributes exactly
  0 to every sum, with 0·log 0 = 0 and finite gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import Array

__all__ = [
    "apply_mask",
    "guided_log_probs",
    "log_softmax",
    "soft_cross_entropy",
    "token_kl",
    "token_nll",
    "upcast",
]


def upcast(x: Array) -> Array:
    """Casts to at least float32 (keeps float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def apply_mask(values: Array, mask: Array | None) -> Array:
    """Zeroes `values` where `mask` is zero (a `where`, so NaN/inf there cannot leak)."""
    if mask is None:
        return values
    mask = jnp.asarray(mask)
    if mask.shape != values.shape:
        raise ValueError(
            f"jaxdetox.losses: mask has shape {mask.shape}, expected the per-position "
            f"shape {values.shape}"
        )
    return jnp.where(mask != 0, values, jnp.zeros_like(values))


def log_softmax(logits_v: Array) -> Array:
    """Log-softmax over the last axis; a row whose entries are all -inf stays all -inf (no NaN)."""
    x = upcast(logits_v)
    # A fully masked row has no distribution; jax.nn.log_softmax would give (-inf) - (-inf).
    # Double `where`: the row is replaced by zeros *before* the op so its backward is finite.
    row_ok = jnp.any(x > -jnp.inf, axis=-1, keepdims=True)
    safe = jax.nn.log_softmax(jnp.where(row_ok, x, 0.0), axis=-1)
    return jnp.where(row_ok, safe, -jnp.inf)


def guided_log_probs(
    base_logits: Array,
    nado_logits: Array | Sequence[Array],
    alpha: float | Array | Sequence[float] = 1.0,
) -> Array:
    """Normalised teacher log q = log_softmax(log_softmax(base) + Σ_c α_c·log σ(nado_c))
    (docs/method.md; one NADO: `nado_logits` an array and `alpha` a scalar)."""
    several = isinstance(nado_logits, list | tuple)
    heads = list(nado_logits) if several else [nado_logits]
    alphas = list(alpha) if isinstance(alpha, list | tuple) else [alpha] * len(heads)
    if len(alphas) != len(heads):
        raise ValueError(f"guided_log_probs: {len(heads)} NADOs but {len(alphas)} alphas")
    for h in heads:
        if base_logits.shape != h.shape:
            raise ValueError(
                f"guided_log_probs: base_logits {base_logits.shape} and nado_logits "
                f"{h.shape} must have the same [..., V] shape"
            )
    # log σ(h) = log R_φ(x, y_<t∘v); with alpha = 1 and an exact R this is the projection
    # q*(v|·) = p(v|·)·R(·∘v)/R(·) because the softmax normaliser equals R(·) (Bellman).
    # Several constraints: with NADO_c exact for C_c under the model guided by NADO_1..c-1,
    # the sum is the projection onto C_1·…·C_n (docs/constraints.md).
    total = log_softmax(base_logits)
    for h, a in zip(heads, alphas):
        total = total + a * jax.nn.log_sigmoid(upcast(h))
    return log_softmax(total)


def token_kl(teacher_logits: Array, student_logits: Array, mask: Array | None = None) -> Array:
    """Exact KL(softmax(teacher) ‖ softmax(student)) over the last axis, one value per position."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"token_kl: teacher_logits {teacher_logits.shape} and student_logits "
            f"{student_logits.shape} must have the same [..., V] shape"
        )
    log_q = log_softmax(teacher_logits)
    log_p = log_softmax(student_logits)
    q = jnp.exp(log_q)
    # 0·log 0 = 0: outside the teacher's support the difference is replaced by 0 *inside* the
    # product, so d/dq of the dropped term is 0 rather than 0·inf = NaN. The gradient w.r.t.
    # student logits is softmax(s) − softmax(t) (tested). If the student puts -inf where the
    # teacher has mass the KL is +inf, which is the true value.
    diff = jnp.where(q > 0, log_q - log_p, 0.0)
    return apply_mask(jnp.sum(q * diff, axis=-1), mask)


def soft_cross_entropy(
    teacher_logits: Array, student_logits: Array, mask: Array | None = None
) -> Array:
    """Soft-target CE −Σ_v q(v)·log p(v) per position (= token_kl + H(q); same student gradient)."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"soft_cross_entropy: teacher_logits {teacher_logits.shape} and student_logits "
            f"{student_logits.shape} must have the same [..., V] shape"
        )
    q = jnp.exp(log_softmax(teacher_logits))
    log_p = log_softmax(student_logits)
    return apply_mask(-jnp.sum(q * jnp.where(q > 0, log_p, 0.0), axis=-1), mask)


def token_nll(logits_v: Array, targets: Array, mask: Array | None = None) -> Array:
    """Per-position −log softmax(logits)[target]; targets at masked positions may be anything."""
    if logits_v.shape[:-1] != targets.shape:
        raise ValueError(
            f"token_nll: logits {logits_v.shape} need targets of shape {logits_v.shape[:-1]}, "
            f"got {targets.shape}"
        )
    targets = jnp.asarray(targets)
    if mask is not None:
        # Padding ids such as -100 would otherwise index out of range.
        targets = jnp.where(jnp.asarray(mask) != 0, targets, 0)
    log_p = log_softmax(logits_v)
    picked = jnp.take_along_axis(log_p, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return apply_mask(-picked, mask)
