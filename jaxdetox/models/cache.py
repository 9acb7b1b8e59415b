"""KV cache: a plain pytree of fixed-size buffers, so prefill and decode steps jit to one shape.

Slots are filled left to right; slot order is time order, which is what the causal mask
compares (a query in slot `i` sees keys in slots `<= i`). `segment_ids == 0` marks a slot
that is empty or holds padding and is never attended to.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdetox.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys/values `[L, B, S, KVH, Dh]`, slot metadata `[B, S]`, next write slot."""

    k: jax.Array  # [L, B, S, KVH, Dh]
    v: jax.Array  # [L, B, S, KVH, Dh]
    segment_ids: jax.Array  # [B, S] int32, 0 = empty slot or padding
    positions: jax.Array  # [B, S] int32 position of the token held in each slot
    index: jax.Array  # [] int32, next slot to write

    @property
    def max_len(self) -> int:
        """Number of slots S."""
        return self.k.shape[2]

    @staticmethod
    def logical_axes() -> KVCache:
        """Logical axis names of each field (same pytree structure), for sharding rules."""
        kv = ("layers", "batch", "length", "kv_heads", "head_dim")
        return KVCache(
            k=kv, v=kv, segment_ids=("batch", "length"), positions=("batch", "length"), index=()
        )


def init_cache(
    config: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | str | None = None
) -> KVCache:
    """An empty cache for `batch` rows and `max_len` slots (dtype defaults to the compute dtype)."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        segment_ids=jnp.zeros((batch, max_len), jnp.int32),
        positions=jnp.zeros((batch, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )
