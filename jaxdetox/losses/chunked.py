"""Memory-lean LM losses that start from hidden states and head weights, not logits.

The regularised objective (docs/method.md) needs, per token, three vocabulary-sized rows:
student logits `h·Wᵀ`, reference logits `h_ref·W_refᵀ` and NADO logits `h_φ·W_φᵀ + b`.
At V = 128k a `[B, T, V]` float32 tensor is 2 GiB for 4k tokens, so (docs/method.md) we scan
over chunks of tokens (time slices of the whole batch): each step builds the three rows for
about `chunk_size` tokens, reduces them
to per-token NLL and KL, and is wrapped in `jax.checkpoint`, so the backward pass recomputes
the chunk instead of keeping `[chunk, V]` residuals for every chunk. Only the student
(`h`, its head) receives gradients; the teacher side is stop-gradient.

`nado_losses` does the same for the NADO objective (BCE via a row gather, the consistency
regulariser's full-vocabulary expectation in chunks). A head is the pair `(w_vd, b_v | None)`
that `model.unembed_weights()` returns (`losses/teacher.py`). Each memory-lean function here
has a full-logit twin built from the same per-token functions in `losses/reference.py`: the
reference the tests compare with (library code never imports it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from jaxdetox.losses.nado import bce_of_selected, consistency_of, one_step_expectation
from jaxdetox.losses.teacher import Head, Teacher, head_logits
from jaxdetox.losses.token import token_kl, token_nll, upcast

__all__ = [
    "default_chunk_size",
    "RegularizedLoss",
    "chunked_guided_nll",
    "chunked_nll",
    "NadoLoss",
    "nado_losses",
    "regularized_lm_loss",
    "regularized_lm_loss_terms",
    "selected_head_logits",
]

# Bounds of the default chunk size (tokens); see `default_chunk_size`.
MIN_CHUNK, MAX_CHUNK = 128, 1024


class RegularizedLoss(NamedTuple):
    """Per-token terms of NLL + λ·KL; the caller applies λ and reduces."""

    nll_bt: Array  # −log p_θ(y_t+1 | y_≤t), 0 where mask_bt is 0
    kl_bt: Array  # KL(q(·|y_≤t) ‖ p_θ(·|y_≤t)), 0 where kl_mask_bt is 0


def default_chunk_size(hidden_size: int) -> int:
    """Largest power of two ≤ D/8 tokens, clipped to [128, 1024]: a [chunk, V] block ≤ [V, D]/8.

    The backward pass must hold one float32 [V, D] gradient of the head anyway; tying the
    chunk to D keeps the few [chunk, V] blocks of a step small next to it. Measured on
    XLA:CPU (benchmarks/kl_memory.py, V = 128256, D = 2048, float32) the regularised loss
    then needs the same temp memory as plain chunked CE (chunk ≤ D/8: ratio 1.00), while
    chunk D/4 gives 1.28× and D/2 1.50×.
    Floor 128 keeps matmuls MXU/GEMM-efficient.
    """
    return int(min(MAX_CHUNK, max(MIN_CHUNK, 2 ** int(math.log2(max(hidden_size // 8, 1))))))


def _check_tokens(where: str, hidden: dict[str, Array], per_token: dict[str, Array]) -> None:
    """Every `hidden` array is [B, T, D] and every `per_token` one [B, T], with one B, T
    (the first hidden array's); the error names `where` and the argument."""
    bt = next(iter(hidden.values())).shape[:2]
    for extra, arrays in ((1, hidden), (0, per_token)):
        for name, x in arrays.items():
            if x.shape[:2] != bt or x.ndim != 2 + extra:
                want = "[B, T, D]" if extra else "[B, T]"
                raise ValueError(
                    f"{where}: {name} must be {want} with B, T = {bt}, got shape {x.shape}"
                )


def chunk_layout(b: int, t: int, d: int, chunk_size: int | None) -> tuple[int, int, int]:
    """`(time steps per chunk, number of chunks, padding of T)` for ~`chunk_size` tokens."""
    if chunk_size is None:
        chunk_size = default_chunk_size(d)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    steps_per_chunk = min(t, max(1, chunk_size // b))
    n_chunks = math.ceil(t / steps_per_chunk)
    return steps_per_chunk, n_chunks, n_chunks * steps_per_chunk - t


def _map_token_chunks(
    fn: Callable[..., tuple[Array, ...]],
    per_token: tuple[Array, ...],
    chunk_size: int | None,
) -> tuple[Array, ...]:
    """Applies `fn` to `[B, c, ...]` time slices of `[B, T, ...]` arrays; returns `[B, T]` outputs.

    A step covers `c = max(1, chunk_size // B)` time steps of every row, i.e. about
    `chunk_size` tokens. Chunking along T (not along the flattened B·T) keeps the batch axis
    in every step, so a batch sharded over devices stays sharded: each device works on its
    own rows at every step. T need not be divisible by `c`: the tail is padded with zeros,
    which every caller's mask zeroes, and sliced off again (the pad copies the inputs; when
    `c` divides T nothing is copied). `per_token[0]` is the student's `[B, T, D]` hidden
    states (its D picks the default chunk size).
    """
    b, t = per_token[0].shape[:2]
    steps_per_chunk, n_chunks, pad = chunk_layout(b, t, per_token[0].shape[-1], chunk_size)

    padded = [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in per_token]

    # The scan runs over chunk *indices* and slices the inputs in place: reshaping them into
    # [n_chunks, B, c, ...] scan operands would transpose (copy) every [B, T, D] input, and
    # measured temp memory then grows with B·T; sliced in place it stays flat. The checkpoint
    # keeps only the index for the backward pass, which re-slices and rebuilds the [B, c, V]
    # rows one chunk at a time.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def body(i: Array) -> tuple[Array, ...]:
        start = i * steps_per_chunk
        return fn(
            *(jax.lax.dynamic_slice_in_dim(x, start, steps_per_chunk, axis=1) for x in padded)
        )

    def from_chunks(y: Array) -> Array:  # [n_chunks, B, c] -> [B, T]
        return jnp.moveaxis(y, 0, 1).reshape(b, n_chunks * steps_per_chunk)[:, :t]

    _, outs = jax.lax.scan(lambda carry, i: (carry, body(i)), None, jnp.arange(n_chunks))
    return tuple(map(from_chunks, outs))


def _accumulating(head: Head) -> Head:
    """The student head in (at least) float32 before the scan: its gradient is summed over
    chunks in the scan carry, which has the weight's dtype; bf16 would round at every chunk.
    Autodiff casts the finished sum back to the weight's dtype once."""
    w, b = head
    return upcast(w), None if b is None else upcast(b)


def _frozen(head: Head) -> Head:
    w, b = head
    return jax.lax.stop_gradient(w), None if b is None else jax.lax.stop_gradient(b)


def regularized_lm_loss_terms(
    h: Array,
    head: Head,
    teacher: Teacher,
    targets: Array,
    mask: Array,
    kl_mask: Array | None = None,
    alpha: float | Array = 1.0,
) -> RegularizedLoss:
    """NLL and KL(q ‖ p_θ) of a block of tokens (any leading shape) from full logits: the
    body of each chunk of `regularized_lm_loss` (and of its full-logit reference). The
    teacher is stop-gradient; `kl_mask` defaults to `mask`."""
    mask = jnp.asarray(mask) != 0
    kl_mask = mask if kl_mask is None else jnp.asarray(kl_mask) != 0
    student = head_logits(h, head)
    log_q = jax.lax.stop_gradient(teacher).log_probs(alpha)
    return RegularizedLoss(token_nll(student, targets, mask), token_kl(log_q, student, kl_mask))


def regularized_lm_loss(
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
    chunk_size: int | None = None,
) -> RegularizedLoss:
    """Per-token NLL and KL(q ‖ p_θ), q = guided(ref, NADO), computed in token chunks.

    Equals its full-logit reference `losses/reference.py::regularized_lm_loss_naive` (values
    and per-token gradients) without materialising any `[B, T, V]` tensor: each chunk is
    `regularized_lm_loss_terms` under `jax.checkpoint`. `mask_bt` selects NLL tokens,
    `kl_mask_bt` (default: `mask_bt`) KL tokens. Loss = Σ mask·nll + λ·Σ kl_mask·kl, formed
    by the caller (the train steps use `fused_lm_loss`, which forms that sum's gradient in
    the forward pass). About `chunk_size` tokens per step (whole time steps of the batch;
    default `default_chunk_size(D)`); T need not be divisible.
    """
    mask = jnp.asarray(mask_bt) != 0
    kl_mask = mask if kl_mask_bt is None else jnp.asarray(kl_mask_bt) != 0
    _check_tokens(
        "regularized_lm_loss",
        {"h_btd": h_btd, "h_ref_btd": h_ref_btd, "h_nado_btd": h_nado_btd},
        {"targets_bt": targets_bt, "mask_bt": mask, "kl_mask_bt": kl_mask},
    )

    head = _accumulating(head)

    def chunk(
        h: Array, h_ref: Array, h_nado: Array, tgt: Array, m: Array, km: Array
    ) -> tuple[Array, Array]:
        teacher = Teacher(h_ref, ref_head, h_nado, nado_head)
        return tuple(regularized_lm_loss_terms(h, head, teacher, tgt, m, km, alpha))

    nll, kl = _map_token_chunks(
        chunk, (h_btd, h_ref_btd, h_nado_btd, targets_bt, mask, kl_mask), chunk_size
    )
    return RegularizedLoss(nll, kl)


def chunked_nll(
    h_btd: Array,
    head: Head,
    targets_bt: Array,
    mask_bt: Array,
    *,
    chunk_size: int | None = None,
) -> Array:
    """Plain per-token cross-entropy from hidden states, in token chunks (the memory baseline).

    Same chunking as `regularized_lm_loss`; use it when λ = 0.
    """
    mask = jnp.asarray(mask_bt) != 0
    _check_tokens("chunked_nll", {"h_btd": h_btd}, {"targets_bt": targets_bt, "mask_bt": mask})

    head = _accumulating(head)

    def chunk(h: Array, tgt: Array, m: Array) -> tuple[Array]:
        return (token_nll(head_logits(h, head), tgt, m),)

    return _map_token_chunks(chunk, (h_btd, targets_bt, mask), chunk_size)[0]


def chunked_guided_nll(
    h_ref_btd: Array,
    ref_head: Head,
    h_nado_btd: Array,
    nado_head: Head,
    targets_bt: Array,
    mask_bt: Array,
    *,
    alpha: float | Array = 1.0,
    chunk_size: int | None = None,
) -> Array:
    """Per-token −log q(y_t+1 | y_≤t) of the guided distribution q = guided(reference, NADO)
    (NADO-guided decoding's model), in token chunks; no gradient is meant to flow."""
    mask = jnp.asarray(mask_bt) != 0
    _check_tokens(
        "chunked_guided_nll",
        {"h_ref_btd": h_ref_btd, "h_nado_btd": h_nado_btd},
        {"targets_bt": targets_bt, "mask_bt": mask},
    )

    def chunk(h_ref: Array, h_nado: Array, tgt: Array, m: Array) -> tuple[Array]:
        log_q = Teacher(h_ref, ref_head, h_nado, nado_head).log_probs(alpha)
        return (token_nll(log_q, tgt, m),)

    return _map_token_chunks(chunk, (h_ref_btd, h_nado_btd, targets_bt, mask), chunk_size)[0]


class NadoLoss(NamedTuple):
    """Per-token NADO terms; the caller weights (importance weights, λ_reg) and reduces."""

    bce_bt: Array  # BCE(σ(h(y_≤t)[y_t+1]), C), 0 where mask_bt is 0
    consistency_bt: Array  # Bellman regulariser at t (pairs t with t+1); 0 if disabled


def selected_head_logits(h: Array, head: Head, targets: Array) -> Array:
    """h·W[y] + b[y] for the realised next tokens only: gathers rows, no [.., V] logits."""
    w_vd, b_v = head
    w_rows = jnp.take(w_vd, targets, axis=0)
    out_dtype = jnp.promote_types(jnp.result_type(h, w_vd), jnp.float32)
    logit = jnp.einsum("...d,...d->...", h, w_rows, preferred_element_type=out_dtype)
    return logit if b_v is None else logit + upcast(jnp.take(b_v, targets, axis=0))


def _shift_left(x: Array) -> Array:
    """x[:, t+1] at position t (zeros at the end): the next prefix's inputs."""
    return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


def nado_losses(
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
    chunk_size: int | None = None,
) -> NadoLoss:
    """`nado_bce` and `nado_consistency` from hidden states, never building [B, T, V] logits.

    The BCE only needs h·W[y_t+1] (a row gather). The consistency needs the full-vocabulary
    expectation s = Σ_v p(v|y_≤t+1)·σ(h(y_≤t+1)[v]) of the *next* position, computed in
    token chunks like `regularized_lm_loss`; `consistency=None` skips it. The base LM
    (`h_base_btd`, `base_head`) is frozen; gradients reach the NADO hidden states and head.
    """
    mask = jnp.asarray(mask_bt) != 0
    _check_tokens(
        "nado_losses",
        {"h_nado_btd": h_nado_btd, "h_base_btd": h_base_btd},
        {"targets_bt": targets_bt, "mask_bt": mask},
    )
    bt = h_nado_btd.shape[:2]
    labels_bt = jnp.broadcast_to(upcast(labels_b)[:, None], bt)
    nado_head = _accumulating(nado_head)
    targets = jnp.where(mask, targets_bt, 0)
    r_logit = selected_head_logits(h_nado_btd, nado_head, targets)
    bce = bce_of_selected(r_logit, labels_bt, mask)
    if consistency is None:
        return NadoLoss(bce, jnp.zeros_like(bce))
    base_head = _frozen(base_head)

    def chunk(h_next: Array, h_base_next: Array, r_logit: Array, pair_mask: Array) -> tuple[Array]:
        log_s, log_1ms = one_step_expectation(
            head_logits(jax.lax.stop_gradient(h_base_next), base_head),
            head_logits(h_next, nado_head),
        )
        return (consistency_of(r_logit, log_s, log_1ms, pair_mask, consistency, reverse),)

    pair_mask = mask & _shift_left(mask)
    (reg,) = _map_token_chunks(
        chunk,
        (_shift_left(h_nado_btd), _shift_left(h_base_btd), r_logit, pair_mask),
        chunk_size,
    )
    return NadoLoss(bce, reg)
