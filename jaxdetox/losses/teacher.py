"""Vocabulary heads and the guided teacher, from hidden states.

A head is the pair `(w_vd, b_v | None)` that `model.unembed_weights()` returns; `head_logits`
turns hidden states into logits with it. `Teacher` is what the guided teacher
q = guided(reference, NADO) (docs/method.md §3) needs per token: the frozen reference LLM's
final hidden states and head, and each NADO's. It is built once per batch stream by the
train steps (`train/steps.py::teacher_features`) and read by the LM losses, which form its
log-probabilities one token chunk at a time (`Teacher.log_probs`), never for the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
from jax import Array

from jaxdetox.losses.token import guided_log_probs
from jaxdetox.models.layers import unembed

__all__ = ["Head", "Teacher", "head_logits"]

Head = tuple[Array, Array | None]


def head_logits(h_nd: Array, head: Head) -> Array:
    """Logits `h·Wᵀ + b` in (at least) float32 (`models.layers.unembed`), shapes checked."""
    w_vd, b_v = head
    if h_nd.shape[-1] != w_vd.shape[-1]:
        raise ValueError(
            f"head_logits: hidden size {h_nd.shape[-1]} does not match head weight "
            f"w_vd {w_vd.shape} (expected [V, {h_nd.shape[-1]}])"
        )
    return unembed(h_nd, w_vd, b_v)


class Teacher(NamedTuple):
    """The guided teacher's inputs: reference and NADO hidden states `[B, T, D]` + heads.

    Several constraints: `h_nado` and `nado_head` are tuples, one entry per NADO (the teacher
    sums their guidance, docs/constraints.md). A pytree: `jax.lax.stop_gradient(teacher)`
    freezes it whole.
    """

    h_ref: Array
    ref_head: Head
    h_nado: Array | tuple[Array, ...]
    nado_head: Head | tuple[Head, ...]

    def nados(self) -> tuple[tuple[Array, Head], ...]:
        """`(h_nado, nado_head)` of every NADO (one pair for a single constraint)."""
        if isinstance(self.h_nado, tuple):
            if len(self.h_nado) != len(self.nado_head):
                raise ValueError(
                    f"Teacher: {len(self.h_nado)} NADO hidden states but "
                    f"{len(self.nado_head)} NADO heads"
                )
            return tuple(zip(self.h_nado, self.nado_head, strict=True))
        return ((self.h_nado, self.nado_head),)

    def hidden(self) -> tuple[Array, ...]:
        """The per-token arrays: `(h_ref, h_nado_1, ...)`, each `[B, T, D]`."""
        return (self.h_ref, *(h for h, _ in self.nados()))

    def with_hidden(self, hidden: Sequence[Array]) -> Teacher:
        """The same heads with other per-token arrays (e.g. one token chunk of `hidden()`)."""
        h_ref, *h_nado = hidden
        several = isinstance(self.h_nado, tuple)
        return self._replace(h_ref=h_ref, h_nado=tuple(h_nado) if several else h_nado[0])

    def log_probs(self, alpha: float | Array | Sequence[float] = 1.0) -> Array:
        """log q = `guided_log_probs(reference logits, NADO logits, α)`, `[..., V]` float32.

        `alpha`: a scalar, or one per NADO (a sequence or a 1-D array).
        """
        nado_logits = [head_logits(h, head) for h, head in self.nados()]
        if not isinstance(alpha, list | tuple) and jnp.ndim(alpha) == 1:
            alpha = [alpha[i] for i in range(jnp.shape(alpha)[0])]
        return guided_log_probs(head_logits(self.h_ref, self.ref_head), nado_logits, alpha)
