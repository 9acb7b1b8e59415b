"""The decode form of a `CausalLM`: what the sampler's decode loop runs instead of the scan.

A training step runs the model's layers as one `lax.scan` over stacked weights. In a decode
loop on XLA:CPU that costs about as much again as the matmuls (GPT-2 small, batch 32;
`benchmarks/README.md`, sampling), so the sampler re-lays the weights and cache once:

- per-layer weights (`decode_params`): slicing layer `i` out of the stacked weights inside
  the loop copies it every step (a dot cannot read a dynamic slice in place), ~340 MB per
  step. Kernels are stored as `[out, in]` matrices (contracted axis innermost), which
  XLA:CPU's dots at decode shapes (`[32, 768] x W`) run ~25 % faster, and read through a
  transposed view that XLA folds into the dot;
  The copies are in the compute dtype (the dots read the weights cast to it anyway), so a
  bfloat16 model holds half-size copies of its float32 masters; norms keep their dtype;
- a per-layer, heads-major cache (`heads_major_cache`: `k` / `v` tuples of `[B, KVH, S, Dh]`):
  the attention dots read it without copying (from `[B, S, KVH, Dh]` XLA transposed the
  whole cache for every layer and step: ~20 ms of a ~100 ms step). The sampler lays out the
  *empty* cache this way before the prefill, which then writes into it, so the cache
  never exists in both layouts at once;
- the layers unrolled (`decode_hidden_states`), using the model's own hooks
  (`attention_context`, `embed_tokens`, the blocks, `final_norm`), so the math is the
  model's: only where the weights and cache live differs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
from flax import nnx

from jaxdetox.models.cache import KVCache
from jaxdetox.models.layers import AttentionContext, CausalLM, advance_cache
from jaxdetox.sharding import constrain


class DecodeParams(NamedTuple):
    """An LM's parameters with its per-layer decode copies (`decode_params`), made once."""

    params: Any  # the model's nnx.Param state (embedding, final norm, head are read here)
    layer_states: tuple  # one nnx.State per layer, kernels as `[out, in]` matrices


def contracted_axes(axes: Sequence[str | None]) -> int | None:
    """How many leading axes a layer kernel contracts in its matmul (None: not a kernel).

    Input kernels (`("embed", ...)`: q/k/v, fc, gate, up) contract their first axis;
    output kernels (`(..., "embed")`: o, proj, down) all but their last.
    """
    if len(axes) < 2:
        return None
    if axes[0] == "embed":
        return 1
    if axes[-1] == "embed":
        return len(axes) - 1
    return None


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _decode_copy(variable: nnx.Variable, i: int, dtype: Any) -> nnx.Variable:
    """Layer `i` of a stacked variable; a kernel becomes an `[out, in]` matrix in `dtype` (the
    compute dtype) that keeps its logical shape in the metadata (`_logical_view` undoes it)."""
    value = variable[...][i]
    k = contracted_axes(variable.get_metadata()["out_sharding"][1:])
    if k is None:
        return variable.replace(value)
    shape = value.shape
    matrix = value.reshape(math.prod(shape[:k]), math.prod(shape[k:])).T.astype(dtype)
    return variable.replace(matrix, logical_shape=shape)


def _logical_view(variable: nnx.Variable) -> nnx.Variable:
    """A `_decode_copy` kernel in its logical shape: a transpose (+ reshape) that XLA folds
    into the consuming dot, so nothing is copied."""
    shape = variable.get_metadata().get("logical_shape")
    if shape is None:
        return variable
    return variable.replace(variable[...].T.reshape(shape))


def decode_params(model: CausalLM, params: Any) -> DecodeParams:
    """`params` plus one decode copy of each layer's weights (`[out, in]` kernels in the
    model's compute dtype)."""
    _, state = nnx.split(model.layers)
    dtype = model.config.jnp_dtype
    layer_states = tuple(
        jax.tree.map(lambda v, i=i: _decode_copy(v, i, dtype), state, is_leaf=_is_variable)
        for i in range(model.config.num_layers)
    )
    return DecodeParams(params, layer_states)


HEADS_MAJOR_AXES = ("batch", "kv_heads", "length", "head_dim")  # one layer's k or v


def heads_major_cache(cache: KVCache) -> KVCache:
    """The cache with `k` / `v` as tuples of per-layer `[B, KVH, S, Dh]` arrays, batch-sharded
    under a mesh: the form `decode_hidden_states` reads and writes in place. On a filled
    cache this is a copy; the sampler calls it on the empty cache (free: a transpose of
    zeros is zeros) before the prefill."""
    return constrain_heads_major(
        dataclasses.replace(
            cache,
            k=tuple(cache.k[i].transpose(0, 2, 1, 3) for i in range(len(cache.k))),
            v=tuple(cache.v[i].transpose(0, 2, 1, 3) for i in range(len(cache.v))),
        )
    )


def constrain_heads_major(cache: KVCache) -> KVCache:
    """Shard a `heads_major_cache` by its logical axes (batch-sharded; no-op without a mesh)."""
    per_layer = lambda kv: tuple(constrain(x, HEADS_MAJOR_AXES) for x in kv)  # noqa: E731
    return dataclasses.replace(
        cache,
        k=per_layer(cache.k),
        v=per_layer(cache.v),
        segment_ids=constrain(cache.segment_ids, ("batch", "length")),
        positions=constrain(cache.positions, ("batch", "length")),
    )


def write_kv_bksh(kv: tuple, k_btkh: jax.Array, v_btkh: jax.Array, index: jax.Array) -> tuple:
    """`AttentionContext.write_kv` for a heads-major layer cache `[B, KVH, S, Dh]`: write the
    new keys/values at slot `index`, return the cache and `[B, S, KVH, Dh]` views of it."""
    k_bksh = jax.lax.dynamic_update_slice(
        kv[0], k_btkh.transpose(0, 2, 1, 3).astype(kv[0].dtype), (0, 0, index, 0)
    )
    v_bksh = jax.lax.dynamic_update_slice(
        kv[1], v_btkh.transpose(0, 2, 1, 3).astype(kv[1].dtype), (0, 0, index, 0)
    )
    # Views: XLA folds the transposes into the attention dots (no copy of the cache).
    return (k_bksh, v_bksh), k_bksh.transpose(0, 2, 1, 3), v_bksh.transpose(0, 2, 1, 3)


def decode_hidden_states(
    model: CausalLM,
    layer_states: Sequence[nnx.State],
    tokens_bt: jax.Array,
    positions_bt: jax.Array,
    segment_ids_bt: jax.Array,
    cache: KVCache,
) -> tuple[jax.Array, KVCache]:
    """`model.hidden_states` on decode-form weights and a `heads_major_cache`: same results."""
    if len(layer_states) != model.config.num_layers:
        raise ValueError(
            f"decode form: expected {model.config.num_layers} per-layer states "
            f"(decode_params), got {len(layer_states)}"
        )
    if not isinstance(cache.k, tuple):
        raise ValueError("decode form: the cache must be per layer, see heads_major_cache(cache)")
    ctx: AttentionContext = model.attention_context(
        tokens_bt.shape, positions_bt, segment_ids_bt, cache
    )._replace(write_kv=write_kv_bksh)
    x_btd = model.embed_tokens(tokens_bt, ctx.positions_bt)
    graphdef = nnx.graphdef(model.layers)
    ks, vs = [], []
    for i, state in enumerate(layer_states):
        # The barrier ties the weights to this step's activations so XLA cannot hoist the
        # (free, folded-into-the-dot) transposed view out of the decode loop as a
        # materialised copy in the logical layout.
        state, x_btd = jax.lax.optimization_barrier((state, x_btd))
        state = jax.tree.map(_logical_view, state, is_leaf=_is_variable)
        x_btd, (k, v) = nnx.merge(graphdef, state)(x_btd, ctx, (cache.k[i], cache.v[i]))
        x_btd = constrain(x_btd, ("batch", "length", "embed"))
        ks.append(k)
        vs.append(v)
    return model.final_norm(x_btd), advance_cache(cache, ctx, (tuple(ks), tuple(vs)))
