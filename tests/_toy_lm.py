"""A tiny pure-JAX causal LM that follows the model call and KV-cache contracts, as a
`DecodeModel` built from plain functions (`FunctionalLM`).

Used by the sampler's tests, which must not depend on the real model families: each
token's logits are a bigram table row plus a projection of the mean of the embeddings it
attends to (same non-zero segment, earlier or same cache slot).
It has the contract's `KVCache` fields, so the sampler's cache handling is exercised.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxdetox.sampling.decode import Cache, Params, repeat_kv_cache


@dataclasses.dataclass(frozen=True)
class FunctionalLM:
    """`DecodeModel` from plain functions following the model call contract.

    `apply_fn(params, tokens_bt, positions_bt, segment_ids_bt, cache) -> (logits_btv, cache)`
    and `init_cache_fn(batch, max_len, dtype) -> cache` (a KVCache-contract pytree). Keep
    one instance per model: instances compare by the identity of the functions, and a new
    one means a new compilation.
    """

    apply_fn: Callable[..., tuple[jax.Array, Cache]]
    init_cache_fn: Callable[[int, int, Any], Cache]

    def apply(
        self,
        params: Params,
        tokens_bt: jax.Array,
        positions_bt: jax.Array,
        segment_ids_bt: jax.Array,
        cache: Cache,
        last_only: bool,
    ) -> tuple[jax.Array, Cache]:
        """Call `apply_fn`; slice the last position when `last_only`."""
        logits_btv, cache = self.apply_fn(params, tokens_bt, positions_bt, segment_ids_bt, cache)
        return (logits_btv[:, -1:] if last_only else logits_btv), cache

    def init_cache(self, params: Params, batch: int, max_len: int, dtype: Any) -> Cache:
        """Call `init_cache_fn` (params are not needed for the shapes here)."""
        del params
        return self.init_cache_fn(batch, max_len, dtype)

    def repeat_cache(self, cache: Cache, repeats: int) -> Cache:
        """KVCache-contract repeat."""
        return repeat_kv_cache(cache, repeats)


class ToyCache(NamedTuple):
    """Same fields and layout as the models' `KVCache` (docs/interfaces.md)."""

    k: jax.Array  # [L=1, B, S, KVH=1, D]
    v: jax.Array  # [L=1, B, S, KVH=1, D]
    segment_ids: jax.Array  # [B, S], 0 = empty slot or padding
    positions: jax.Array  # [B, S]
    index: jax.Array  # int32 scalar, next write slot


def init_toy_params(key: jax.Array, vocab: int, dim: int = 8, max_pos: int = 64) -> dict:
    """Random parameters; logits are O(1) so sampling has real spread."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "embed": jax.random.normal(k1, (vocab, dim)),
        "pos": 0.3 * jax.random.normal(k2, (max_pos, dim)),
        "out": jax.random.normal(k3, (dim, vocab)) / jnp.sqrt(dim),
        "bigram": jax.random.normal(k4, (vocab, vocab)),
    }


def init_toy_cache(batch: int, max_len: int, dtype: Any, *, dim: int = 8) -> ToyCache:
    """An empty cache."""
    zeros = jnp.zeros((1, batch, max_len, 1, dim), dtype)
    slots = jnp.zeros((batch, max_len), jnp.int32)
    return ToyCache(zeros, zeros, slots, slots, jnp.int32(0))


def toy_apply(
    params: dict,
    tokens_bt: jax.Array,
    positions_bt: jax.Array,
    segment_ids_bt: jax.Array,
    cache: ToyCache,
) -> tuple[jax.Array, ToyCache]:
    """Write the `T` tokens at `[index, index + T)` and return float32 logits `[B, T, V]`."""
    _, seq = tokens_bt.shape
    x_btd = params["embed"][tokens_bt] + params["pos"][positions_bt]
    start = cache.index
    write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, start, axis=1)  # noqa: E731
    k = jax.lax.dynamic_update_slice_in_dim(
        cache.k, x_btd[None, :, :, None].astype(cache.k.dtype), start, axis=2
    )
    segs_bs = write(cache.segment_ids, segment_ids_bt)
    cache = ToyCache(k, k, segs_bs, write(cache.positions, positions_bt), start + seq)
    slot_t = start + jnp.arange(seq)
    slot_s = jnp.arange(segs_bs.shape[1])
    mask_bts = (
        (segment_ids_bt[:, :, None] == segs_bs[:, None, :])
        & (segment_ids_bt[:, :, None] != 0)
        & (slot_s[None, None, :] <= slot_t[None, :, None])
    )
    v_bsd = cache.v[0, :, :, 0].astype(jnp.float32)
    count_bt1 = jnp.maximum(mask_bts.sum(-1, keepdims=True), 1)
    ctx_btd = jnp.einsum("bts,bsd->btd", mask_bts.astype(jnp.float32), v_bsd) / count_bt1
    logits_btv = jnp.einsum("btd,dv->btv", ctx_btd, params["out"]) + params["bigram"][tokens_bt]
    return logits_btv.astype(jnp.float32), cache


@functools.cache
def toy_model(dim: int = 8) -> FunctionalLM:
    """The toy as a `DecodeModel` (one instance per `dim`, so compilations are reused)."""
    return FunctionalLM(toy_apply, functools.partial(init_toy_cache, dim=dim))


def toy_forward(params: dict, tokens_bt: jax.Array, segment_ids_bt: jax.Array) -> jax.Array:
    """Teacher-forced logits without a prior cache (positions count real tokens per row)."""
    real_bt = (segment_ids_bt != 0).astype(jnp.int32)
    positions_bt = jnp.maximum(jnp.cumsum(real_bt, axis=1) - 1, 0)
    dim = params["embed"].shape[1]
    cache = init_toy_cache(tokens_bt.shape[0], tokens_bt.shape[1], jnp.float32, dim=dim)
    return toy_apply(params, tokens_bt, positions_bt, segment_ids_bt, cache)[0]
