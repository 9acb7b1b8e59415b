"""`DecodeModel`s for the Flax NNX models (jaxdetox/models): graphdef + params as arguments.

An adapter holds only the graphdef (hashable, compared by structure), so every model with
the same architecture shares compiled samplers, and parameters travel as arguments. The
prefill computes logits for the last position only (hidden states -> one unembedding row
per prompt) instead of `[B, P, V]`.

- `NnxLM`: Llama / GPT-2 `CausalLM`s and the separate-body `NadoModel` (own KV cache); a
  `CausalLM` decodes in its decode form (`decode_form.py`).
- `NnxSharedNado`: the shared-backbone `NadoModel` (a head on the LM's hidden states).
- `decode_model_for(module)` picks the right one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from jaxdetox import sharding
from jaxdetox.models.cache import init_cache
from jaxdetox.models.layers import CausalLM, unembed
from jaxdetox.sampling.decode import Cache, Params, repeat_kv_cache
from jaxdetox.sampling.decode_form import (
    DecodeParams,
    constrain_heads_major,
    decode_hidden_states,
    decode_params,
    heads_major_cache,
)


def _constrain_cache(cache: Any) -> Any:
    """Batch-shard a `KVCache` (stacked or heads-major) by its logical axes when a mesh is
    set (no-op otherwise)."""
    if cache is None:
        return None
    if isinstance(cache.k, tuple):
        return constrain_heads_major(cache)
    return jax.tree.map(
        sharding.constrain,
        cache,
        type(cache).logical_axes(),
        is_leaf=lambda x: isinstance(x, jax.Array),
    )


def _project(module: nnx.Module, h_btd: jax.Array) -> jax.Array:
    """float32 logits of the module's head (`unembed_weights()`, in the activations' dtype)."""
    w_vd, bias_v = module.unembed_weights()
    return unembed(h_btd, w_vd.astype(h_btd.dtype), bias_v)


def _unwrap(params: Params | DecodeParams) -> tuple[Params, tuple | None]:
    """`(params, layer_states or None)` from plain or prepared parameters."""
    if isinstance(params, DecodeParams):
        return params.params, params.layer_states
    return params, None


@dataclasses.dataclass(frozen=True)
class NnxLM:
    """A module with the causal-LM call convention, `hidden_states` and `unembed_weights`
    (docs/interfaces.md); its cache comes from `module.init_cache` if it has one, else
    `jaxdetox.models.init_cache(module.config, ...)`."""

    graphdef: nnx.GraphDef
    reads_lm_hidden = False

    def hidden_states(
        self,
        params: Params,
        tokens_bt: jax.Array,
        positions_bt: jax.Array,
        segment_ids_bt: jax.Array,
        cache: Cache,
    ) -> tuple[jax.Array, Cache]:
        """Final hidden states `[B, T, D]` and the updated cache.

        Prepared weights with the per-layer decode cache (`prepare_decode`) run the decode
        form; anything else (the prefill, on the stacked cache) the model's scanned form.
        """
        params, layer_states = _unwrap(params)
        module = nnx.merge(self.graphdef, params)
        if layer_states is not None and cache is not None and isinstance(cache.k, tuple):
            return decode_hidden_states(
                module, layer_states, tokens_bt, positions_bt, segment_ids_bt, cache
            )
        return module.hidden_states(
            tokens_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt, cache=cache
        )

    def project(self, params: Params, h_btd: jax.Array) -> jax.Array:
        """Vocabulary logits of hidden states, float32."""
        return _project(nnx.merge(self.graphdef, _unwrap(params)[0]), h_btd)

    def prepare_params(self, params: Params) -> Params:
        """A `CausalLM`'s decode-form weights (`decode_form.decode_params`), made once.

        `Sampler.prepare` calls this once so that many batches share the per-layer copies;
        otherwise `prepare_decode` makes them inside every call. Other modules (the NADO
        body) keep the scanned form and get their parameters back unchanged.
        """
        if isinstance(params, DecodeParams):
            return params
        module = nnx.merge(self.graphdef, params)
        if not isinstance(module, CausalLM):
            return params
        return decode_params(module, params)

    def prepare_decode(self, params: Params, cache: Cache) -> tuple[Params, Cache]:
        """Decode-form weights (`prepare_params`) and the per-layer heads-major cache. The
        sampler calls it on the empty cache, before the prefill (which then runs the decode
        form too), so the cache is never held in both layouts."""
        params = self.prepare_params(params)
        if not isinstance(params, DecodeParams) or cache is None:
            return params, cache
        return params, heads_major_cache(cache)

    def apply(
        self,
        params: Params,
        tokens_bt: jax.Array,
        positions_bt: jax.Array,
        segment_ids_bt: jax.Array,
        cache: Cache,
        last_only: bool,
    ) -> tuple[jax.Array, Cache]:
        """Float32 logits (last position only if `last_only`) and the updated cache."""
        h_btd, cache = self.hidden_states(params, tokens_bt, positions_bt, segment_ids_bt, cache)
        return self.project(params, h_btd[:, -1:] if last_only else h_btd), cache

    def init_cache(self, params: Params, batch: int, max_len: int, dtype: Any) -> Cache:
        """An empty KV cache, batch-sharded under a mesh."""
        module = nnx.merge(self.graphdef, _unwrap(params)[0])
        if hasattr(module, "init_cache"):
            cache = module.init_cache(batch, max_len, dtype)
        else:
            cache = init_cache(module.config, batch, max_len, dtype)
        return _constrain_cache(cache)

    def repeat_cache(self, cache: Cache, repeats: int) -> Cache:
        """Repeat rows for k samples per prompt, keeping the batch sharding."""
        return _constrain_cache(repeat_kv_cache(cache, repeats))


@dataclasses.dataclass(frozen=True)
class NnxSharedNado:
    """The shared-backbone NADO: only a head, applied to the LM's final hidden states."""

    graphdef: nnx.GraphDef
    reads_lm_hidden = True

    def project(self, params: Params, h_btd: jax.Array) -> jax.Array:
        """NADO logits `h_φ` of the LM's hidden states (through the head's feature map), float32."""
        module = nnx.merge(self.graphdef, params)
        features_btd, _ = module.hidden_states(None, lm_hidden_btd=h_btd)
        return _project(module, features_btd)

    def apply(self, *args: Any, **kwargs: Any) -> tuple[jax.Array, Cache]:
        """Not callable on tokens: the sampler feeds it the LM's hidden states."""
        raise TypeError("a shared-backbone NADO reads the LM's hidden states; use project()")

    def init_cache(self, params: Params, batch: int, max_len: int, dtype: Any) -> Cache:
        """No cache of its own."""
        return None

    def repeat_cache(self, cache: Cache, repeats: int) -> Cache:
        """No cache of its own."""
        return None


def decode_model_for(module: nnx.Module) -> tuple[NnxLM | NnxSharedNado, Params]:
    """`(decode_model, params)` for an LM or NADO module (shared NADO -> `NnxSharedNado`)."""
    graphdef, params = nnx.split(module, nnx.Param)
    if getattr(getattr(module, "config", None), "variant", None) == "shared":
        return NnxSharedNado(graphdef), params
    return NnxLM(graphdef), params
