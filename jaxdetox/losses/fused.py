"""The regularised LM loss with its gradient formed in the forward pass (fused chunks).

`regularized_lm_loss` checkpoints each token chunk, so its backward recomputes all three
vocabulary rows (student, reference, NADO): 6 `[chunk, V]` logits matmuls + 2 gradient
matmuls per chunk. But the loss is a *weighted sum* whose per-token weights are known up
front, and its gradient with respect to the student logits is closed form:

    ∂/∂z [ w·NLL(z, y) + k·KL(q ‖ softmax z) ] = (w + k)·softmax(z) − w·onehot(y) − k·q

(∂ token_nll / ∂z = softmax(z) − onehot(y); ∂ token_kl / ∂z = Σq·softmax(z) − q, which is
softmax(z) − q except on a fully masked teacher row, where q = 0 and the KL is 0). So each
chunk builds its logits, computes the per-token terms with the library's own `token_nll`,
`token_kl` and `Teacher.log_probs` (= `guided_log_probs`, with their −inf and 0·log 0
guards), emits `dh = g·W` and accumulates `dW += gᵀ·h` (and `db`) right away — the "fused
linear cross-entropy" idea — and the backward only scales them by the incoming cotangent.
That is 3 logits + 2 gradient matmuls per chunk (1 + 2 without a teacher), with the memory
of the chunked form: residuals `[B, T, D]` and one `[V, D]` (+ `[V]`).

Only the returned `loss` is differentiable (in `h` and the student head); the per-token
`nll_bt` / `kl_bt` it also returns are for metrics. Tested against the full-logit
`losses/reference.py::fused_lm_loss_naive` (values and gradients) in
tests/test_losses_fused.py.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from jaxdetox.losses.chunked import chunk_layout
from jaxdetox.losses.teacher import Head, Teacher, head_logits
from jaxdetox.losses.token import log_softmax, token_kl, token_nll

F32 = jnp.float32


class FusedLoss(NamedTuple):
    """`loss` = Σ w·NLL + Σ k·KL (differentiable); per-token terms for metrics (not)."""

    loss: Array
    nll_bt: Array
    kl_bt: Array


def _pad_t(x: Array, pad: int) -> Array:
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def _forward(
    h: Array,
    w: Array,
    b: Array | None,
    teacher: Teacher | None,
    targets: Array,
    nll_w: Array,
    kl_w: Array,
    alpha: Array,
    chunk_size: int | None,
) -> tuple[FusedLoss, tuple[Array, Array, Array | None]]:
    batch, t, d = h.shape
    steps, n_chunks, pad = chunk_layout(batch, t, d, chunk_size)
    per_token = [h, targets, nll_w, kl_w, *(() if teacher is None else teacher.hidden())]
    padded = [_pad_t(x, pad) for x in per_token]
    w32 = w.astype(F32)

    def body(carry: tuple[Array, Array | None], i: Array) -> tuple:
        dw, db = carry
        sl = [jax.lax.dynamic_slice_in_dim(x, i * steps, steps, axis=1) for x in padded]
        hc, tc, nw, kw = sl[:4]
        logits = head_logits(hc, (w, b))  # [B, c, V] float32
        nll = token_nll(logits, tc)
        # softmax(z) as token_nll / token_kl compute it (XLA shares the one log_softmax).
        p = jnp.exp(log_softmax(logits))
        g = nw[..., None] * (p - jax.nn.one_hot(tc, p.shape[-1], dtype=F32))
        kl = jnp.zeros_like(nll)
        if teacher is not None:
            log_q = teacher.with_hidden(sl[4:]).log_probs(alpha)
            kl = token_kl(log_q, logits)
            q = jnp.exp(log_softmax(log_q))  # token_kl's q
            g = g + kw[..., None] * (jnp.sum(q, axis=-1, keepdims=True) * p - q)
        dh = jnp.einsum("BCV,VD->BCD", g, w32)
        dw = dw + jnp.einsum("BCV,BCD->VD", g, hc.astype(F32))
        if db is not None:
            db = db + jnp.sum(g, axis=(0, 1))
        return (dw, db), (nll, kl, dh)

    init = (jnp.zeros(w.shape, F32), None if b is None else jnp.zeros(b.shape, F32))
    (dw, db), (nll, kl, dh) = jax.lax.scan(body, init, jnp.arange(n_chunks))

    def tokens(y: Array) -> Array:  # [n_chunks, B, c, ...] -> [B, T, ...]
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape(batch, n_chunks * steps, *y.shape[3:])[:, :t]

    nll, kl, dh = tokens(nll), tokens(kl), tokens(dh)
    loss = jnp.sum(nll_w * nll) + jnp.sum(kl_w * kl)
    return FusedLoss(loss, nll, kl), (dh, dw, db)


@jax.custom_vjp
def _fused(h, w, b, teacher, targets, nll_w, kl_w, alpha, chunk_size):  # noqa: ANN001, ANN202
    return _forward(h, w, b, teacher, targets, nll_w, kl_w, alpha, chunk_size)[0]


def _fused_fwd(h, w, b, teacher, targets, nll_w, kl_w, alpha, chunk_size):  # noqa: ANN001, ANN202
    out, (dh, dw, db) = _forward(h, w, b, teacher, targets, nll_w, kl_w, alpha, chunk_size)
    return out, (dh.astype(h.dtype), dw.astype(w.dtype), None if db is None else db.astype(b.dtype))


def _fused_bwd(res, cts):  # noqa: ANN001, ANN202
    dh, dw, db = res
    c = cts.loss  # the per-token outputs carry no gradient (metrics)
    grads = (c.astype(dh.dtype) * dh, c.astype(dw.dtype) * dw)
    return (
        *grads,
        None if db is None else c.astype(db.dtype) * db,
        None,
        None,
        None,
        None,
        None,
        None,
    )


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_lm_loss(
    h_btd: Array,
    head: Head,
    targets_bt: Array,
    nll_weight_bt: Array,
    *,
    kl_weight_bt: Array | None = None,
    teacher: Teacher | None = None,
    alpha: float | Array | tuple[float, ...] = 1.0,
    chunk_size: int | None = None,
) -> FusedLoss:
    """Σ nll_weight·NLL + Σ kl_weight·KL(q ‖ p_θ) with q = guided(reference, NADO), in token
    chunks, its gradient (in `h_btd` and the student head) formed in the forward pass.

    `teacher`: the reference's and NADO's hidden states `[B, T, D]` and heads
    (stop-gradient; None: NLL only); several constraints: its `h_nado` and `nado_head` are
    tuples (one per NADO) and `alpha` a sequence of the same length. Weights are float
    `[B, T]`, 0 where a token does not count.
    """
    w, b = head
    if teacher is not None:
        if not isinstance(teacher, Teacher):
            raise TypeError(
                f"fused_lm_loss: teacher must be a losses.Teacher, got {type(teacher).__name__}"
            )
        teacher = jax.lax.stop_gradient(teacher)
    zeros = jnp.zeros(targets_bt.shape, F32)
    kl_w = zeros if kl_weight_bt is None or teacher is None else kl_weight_bt.astype(F32)
    return _fused(
        h_btd, w, b, teacher, targets_bt.astype(jnp.int32), nll_weight_bt.astype(F32), kl_w,
        jnp.asarray(alpha, F32), chunk_size,
    )  # fmt: skip
