"""`DecodeModel` for the Flax NNX model families (jaxdetox/models): graphdef + params.

`NnxLM` holds only the graphdef (hashable, compared by structure), so every model with the
same architecture shares compiled samplers, and parameters travel as arguments. The
prefill computes logits for the last position only (hidden states -> one unembedding row
per prompt) instead of `[B, P, V]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdetox import sharding
from jaxdetox.sampling.decode import Cache, Params, repeat_kv_cache


def _constrain_cache(cache: Any) -> Any:
    """Batch-shard a `KVCache` by its logical axes when a mesh is set (no-op otherwise)."""
    return jax.tree.map(
        sharding.constrain,
        cache,
        type(cache).logical_axes(),
        is_leaf=lambda x: isinstance(x, jax.Array),
    )


@dataclasses.dataclass(frozen=True)
class NnxLM:
    """A jaxdetox causal LM (Llama, GPT-2, or anything with the same call convention).

    The module must provide `hidden_states(...)`, `unembed_weights()` and `config`
    (docs/interfaces.md); `init_cache` comes from `jaxdetox.models.init_cache`.
    """

    graphdef: nnx.GraphDef

    @classmethod
    def from_module(cls, module: nnx.Module) -> tuple[NnxLM, Params]:
        """Split a module into the decode model and its parameters."""
        graphdef, params = nnx.split(module, nnx.Param)
        return cls(graphdef), params

    def apply(
        self,
        params: Params,
        tokens_bt: jax.Array,
        positions_bt: jax.Array,
        segment_ids_bt: jax.Array,
        cache: Cache,
        last_only: bool,
    ) -> tuple[jax.Array, Cache]:
        """Merge params into the graph and run it; float32 logits."""
        model = nnx.merge(self.graphdef, params)
        kwargs = dict(positions_bt=positions_bt, segment_ids_bt=segment_ids_bt, cache=cache)
        if not last_only:
            return model(tokens_bt, **kwargs)
        h_btd, cache = model.hidden_states(tokens_bt, **kwargs)
        w_vd, bias_v = model.unembed_weights()
        h_b1d = h_btd[:, -1:]
        logits_b1v = jnp.einsum(
            "BTD,VD->BTV", h_b1d, w_vd.astype(h_b1d.dtype), preferred_element_type=jnp.float32
        )
        if bias_v is not None:
            logits_b1v = logits_b1v + bias_v.astype(jnp.float32)
        return logits_b1v, cache

    def init_cache(self, params: Params, batch: int, max_len: int, dtype: Any) -> Cache:
        """An empty `KVCache` for the module's config, batch-sharded under a mesh."""
        from jaxdetox.models import init_cache

        config = nnx.merge(self.graphdef, params).config
        return _constrain_cache(init_cache(config, batch, max_len, dtype))

    def repeat_cache(self, cache: Cache, repeats: int) -> Cache:
        """Repeat rows for k samples per prompt, keeping the batch sharding."""
        return _constrain_cache(repeat_kv_cache(cache, repeats))
