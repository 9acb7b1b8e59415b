"""The sampling loop: prefill + KV-cache decode of a batch, as one pure, jit-able function.

`sample_loop` is traced once per static configuration (model graph, batch size, prompt
bucket, `StaticSpec`); parameters, prompts and the runtime values (temperature, top-p,
alpha, seed) are arguments, so fresh parameters each training iteration reuse the same
executable. Compilation caching and bucketing live in `jaxdetox/sampling/sampler.py`.

Layout of one call (`B` prompts, bucket length `P`, `k` samples each, `T` new tokens):
1. prefill the left-padded prompts once, keeping only the last position's logits (a model
   with a decode form, `prepare_decode`, re-lays its weights and the empty cache first);
2. repeat logits and cache `k` times along the batch (`N = B*k` rows, row `i` continues
   prompt `i // k`), so the prompt is never re-encoded per sample;
3. draw token 0 from the prefill logits, then a `lax.while_loop` feeds the previous token
   and draws the next one, until `T` tokens or every row has emitted a stop token.
The cache holds `P + T - 1` slots (the last drawn token is never fed back), in the model's
compute dtype unless `SamplingConfig.cache_dtype` says otherwise.

Randomness: row `r` (global id `row_base * k + sample`) at step `t` uses
`fold_in(fold_in(key(seed), r), t)`, so draws depend neither on the batch layout nor on
the sharding, and the same prompt index always gets the same completions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jaxdetox.losses import guided_log_probs
from jaxdetox.models.layers import default_positions
from jaxdetox.sampling import warpers
from jaxdetox.sampling.types import RuntimeValues, SampleOutput, StaticSpec

Cache = Any
Params = Any


class DecodeModel(Protocol):
    """A causal LM in pure-function form. Hashable: it is a static argument of the jit.

    Optional extras (see `adapters.py`): `hidden_states(params, tokens, positions, segments,
    cache) -> (h_btd, cache)` and `project(params, h_btd) -> logits` on an LM, and
    `reads_lm_hidden = True` on a NADO whose head reads the LM's hidden states (it then
    needs only `project`, `init_cache`/`repeat_cache` returning None).
    """

    def apply(
        self,
        params: Params,
        tokens_bt: jax.Array,
        positions_bt: jax.Array,
        segment_ids_bt: jax.Array,
        cache: Cache,
        last_only: bool,
    ) -> tuple[jax.Array, Cache]:
        """Run the model over `tokens_bt` writing into `cache`; logits of the last position only if `last_only`."""
        ...

    def init_cache(self, params: Params, batch: int, max_len: int, dtype: Any) -> Cache:
        """An empty cache for `batch` rows and `max_len` slots (`dtype` None: compute dtype)."""
        ...

    def repeat_cache(self, cache: Cache, repeats: int) -> Cache:
        """Repeat every batch row `repeats` times (row i -> rows i*repeats ... i*repeats+repeats-1)."""
        ...


def repeat_kv_cache(cache: Cache, repeats: int) -> Cache:
    """`repeat_cache` for caches following the KVCache contract (docs/interfaces.md).

    Leaves named `k` / `v` are `[L, B, S, KVH, Dh]` (batch axis 1), scalars (`index`) are
    shared, every other leaf (`segment_ids`, `positions`, per-layer `k[i]` / `v[i]` tuples
    of the decode form) has the batch first.
    """

    def repeat_leaf(path: tuple, leaf: jax.Array) -> jax.Array:
        if leaf.ndim == 0 or repeats == 1:
            return leaf
        # A stacked `k` / `v` leaf is named by the last path entry; a per-layer one (the
        # decode form's tuples of `[B, KVH, S, Dh]`) by an index into the tuple: batch axis 0.
        name = getattr(path[-1], "name", getattr(path[-1], "key", None)) if path else None
        axis = 1 if name in ("k", "v") else 0
        return jnp.repeat(leaf, repeats, axis=axis)

    return jax.tree_util.tree_map_with_path(repeat_leaf, cache)


def prompt_positions(segment_ids_bp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Positions (running count of real tokens, pads clipped to 0) and per-row prompt lengths."""
    lengths_b = jnp.sum(segment_ids_bp != 0, axis=1, dtype=jnp.int32)
    return default_positions(segment_ids_bp), lengths_b


def _token_log_prob(logits_nv: jax.Array, tokens_n: jax.Array) -> jax.Array:
    """log_softmax(logits)[token] per row, in float32."""
    log_probs_nv = jax.nn.log_softmax(logits_nv.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs_nv, tokens_n[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class _Draw:
    """One step's draw for every row."""

    tokens_n: jax.Array
    logprobs_n: jax.Array
    model_logprobs_n: jax.Array
    base_logprobs_n: jax.Array | None


def _draw(
    spec: StaticSpec,
    values: RuntimeValues,
    keys_n: jax.Array,
    step: jax.Array,
    base_logits_nv: jax.Array,
    nado_logits_nv: jax.Array | None,
) -> _Draw:
    """Choose the next token of every row and its log-probs (sampling, model, base)."""
    if nado_logits_nv is None:
        # Warp the raw logits (not log_softmax) so masks match transformers bit for bit.
        model_nv = base_logits_nv.astype(jnp.float32)
    else:
        model_nv = guided_log_probs(base_logits_nv, nado_logits_nv, values.alpha)
    step_keys_n = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_n, step)
    if spec.greedy:
        tokens_n = warpers.select_tokens(step_keys_n, model_nv, greedy=True)
        logprobs_n = jnp.zeros(tokens_n.shape, jnp.float32)  # a point mass
    else:
        warped_nv = warpers.warp_logits(
            model_nv,
            temperature=values.temperature,
            top_k=spec.top_k,
            top_p=values.top_p,
            use_top_p=spec.use_top_p,
        )
        tokens_n = warpers.select_tokens(step_keys_n, warped_nv, greedy=False)
        logprobs_n = _token_log_prob(warped_nv, tokens_n)
    base_n = None if nado_logits_nv is None else _token_log_prob(base_logits_nv, tokens_n)
    return _Draw(tokens_n, logprobs_n, _token_log_prob(model_nv, tokens_n), base_n)


def _forward(
    model: DecodeModel,
    nado: DecodeModel | None,
    params: Params,
    nado_params: Params | None,
    tokens_bt: jax.Array,
    positions_bt: jax.Array,
    segment_ids_bt: jax.Array,
    lm_cache: Cache,
    nado_cache: Cache,
    last_only: bool,
) -> tuple[jax.Array, jax.Array | None, Cache, Cache]:
    """Last-position float32 logits `[B, V]` of the LM (and NADO), and both updated caches.

    A NADO with `reads_lm_hidden` (the shared-backbone variant) has no body and no cache:
    its head reads the LM's final hidden states, so the LM runs once for both.
    """
    if nado is not None and getattr(nado, "reads_lm_hidden", False):
        h_btd, lm_cache = model.hidden_states(
            params, tokens_bt, positions_bt, segment_ids_bt, lm_cache
        )
        h_b1d = h_btd[:, -1:]
        base_b1v = model.project(params, h_b1d)
        nado_b1v = nado.project(nado_params, h_b1d)
        return base_b1v[:, -1], nado_b1v[:, -1], lm_cache, nado_cache
    base_b1v, lm_cache = model.apply(
        params, tokens_bt, positions_bt, segment_ids_bt, lm_cache, last_only
    )
    nado_bv = None
    if nado is not None:
        nado_b1v, nado_cache = nado.apply(
            nado_params, tokens_bt, positions_bt, segment_ids_bt, nado_cache, last_only
        )
        nado_bv = nado_b1v[:, -1].astype(jnp.float32)
    return base_b1v[:, -1].astype(jnp.float32), nado_bv, lm_cache, nado_cache


def sample_loop(
    model: DecodeModel,
    nado: DecodeModel | None,
    spec: StaticSpec,
    params: Params,
    nado_params: Params | None,
    prompt_bp: jax.Array,
    segment_ids_bp: jax.Array,
    row_base_b: jax.Array,
    values: RuntimeValues,
) -> SampleOutput:
    """Prefill + decode `spec.num_samples` completions per left-padded prompt (jit-able).

    `prompt_bp` int32 `[B, P]` left-padded, `segment_ids_bp` 1 on real tokens and 0 on
    padding, `row_base_b` int32 `[B]` the global index of each prompt (it seeds its rows).
    With `nado` set, tokens are drawn from the guided distribution of docs/method.md; a
    separate NADO keeps its own cache, a shared-head NADO reads the LM's hidden states.
    """
    batch, prompt_len = prompt_bp.shape
    k, num_new = spec.num_samples, spec.max_new_tokens
    rows = batch * k
    cache_len = prompt_len + num_new - 1
    cache_dtype = spec.cache_jnp_dtype
    prompt_bp = prompt_bp.astype(jnp.int32)
    segment_ids_bp = segment_ids_bp.astype(jnp.int32)
    positions_bp, prompt_lens_b = prompt_positions(segment_ids_bp)

    lm_cache = model.init_cache(params, batch, cache_len, cache_dtype)
    nado_cache = (
        nado.init_cache(nado_params, batch, cache_len, cache_dtype) if nado is not None else None
    )
    # Models may re-lay their weights and cache once for the loop (per-layer, NnxLM); with
    # one new token there is no decode step to pay it back. The empty cache is re-laid
    # before the prefill, which then fills it in that layout: no second copy of the cache.
    if num_new > 1 and hasattr(model, "prepare_decode"):
        params, lm_cache = model.prepare_decode(params, lm_cache)
    if num_new > 1 and nado is not None and hasattr(nado, "prepare_decode"):
        nado_params, nado_cache = nado.prepare_decode(nado_params, nado_cache)
    base_logits_bv, nado_logits_bv, lm_cache, nado_cache = _forward(
        model, nado, params, nado_params,
        prompt_bp, positions_bp, segment_ids_bp, lm_cache, nado_cache, last_only=True,
    )  # fmt: skip
    # k samples per prompt: repeat the prefilled state, never the prefill itself.
    base_logits_nv = jnp.repeat(base_logits_bv, k, axis=0)
    nado_logits_nv = None if nado is None else jnp.repeat(nado_logits_bv, k, axis=0)
    lm_cache = model.repeat_cache(lm_cache, k)
    nado_cache = nado.repeat_cache(nado_cache, k) if nado is not None else None

    prompt_lens_n = jnp.repeat(prompt_lens_b, k)
    row_ids_n = (
        row_base_b.astype(jnp.int32)[:, None] * k + jnp.arange(k, dtype=jnp.int32)
    ).reshape(-1)
    root_key = jax.random.key(values.seed)
    keys_n = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(root_key, row_ids_n)
    stop_e = values.stop_ids
    pad = values.pad_token_id
    guided = nado is not None

    def record(state: dict, step: jax.Array, draw: _Draw) -> dict:
        """Write step `step`'s draw; rows that already stopped get padding and zeros."""
        done_n = state["done"]
        tokens_n = jnp.where(done_n, pad, draw.tokens_n)
        put = lambda buf, col, fill: buf.at[:, step].set(jnp.where(done_n, fill, col))  # noqa: E731
        new = dict(state)
        new["tokens"] = put(state["tokens"], tokens_n, pad)
        new["logprobs"] = put(state["logprobs"], draw.logprobs_n, 0.0)
        new["model_logprobs"] = put(state["model_logprobs"], draw.model_logprobs_n, 0.0)
        if guided:
            new["base_logprobs"] = put(state["base_logprobs"], draw.base_logprobs_n, 0.0)
        new["lengths"] = state["lengths"] + (~done_n).astype(jnp.int32)
        new["done"] = done_n | jnp.any(tokens_n[:, None] == stop_e[None, :], axis=-1)
        new["last"] = tokens_n
        new["step"] = step + 1
        return new

    zeros_nt = jnp.zeros((rows, num_new), jnp.float32)
    state = {
        "tokens": jnp.full((rows, num_new), pad, jnp.int32),
        "logprobs": zeros_nt,
        "model_logprobs": zeros_nt,
        "lengths": jnp.zeros((rows,), jnp.int32),
        "done": jnp.zeros((rows,), bool),
        "lm_cache": lm_cache,
        "nado_cache": nado_cache,
    }
    if guided:
        state["base_logprobs"] = zeros_nt
    step0 = jnp.int32(0)
    state = record(state, step0, _draw(spec, values, keys_n, step0, base_logits_nv, nado_logits_nv))

    def cond(state: dict) -> jax.Array:
        return (state["step"] < num_new) & ~jnp.all(state["done"])

    def body(state: dict) -> dict:
        step = state["step"]
        tokens_n1 = state["last"][:, None]
        # The token drawn at step s-1 sits at position prompt_len + s - 1.
        positions_n1 = (prompt_lens_n + step - 1)[:, None]
        segments_n1 = jnp.ones_like(tokens_n1)
        base_logits_nv, nado_logits_nv, lm_cache, nado_cache = _forward(
            model, nado, params, nado_params,
            tokens_n1, positions_n1, segments_n1, state["lm_cache"], state["nado_cache"],
            last_only=False,
        )  # fmt: skip
        draw = _draw(spec, values, keys_n, step, base_logits_nv, nado_logits_nv)
        new = record(state, step, draw)
        new["lm_cache"], new["nado_cache"] = lm_cache, nado_cache
        return new

    state = jax.lax.while_loop(cond, body, state)
    return SampleOutput(
        tokens=state["tokens"],
        lengths=state["lengths"],
        logprobs=state["logprobs"],
        model_logprobs=state["model_logprobs"],
        base_logprobs=state.get("base_logprobs"),
        prompt_index=jnp.repeat(row_base_b.astype(jnp.int32), k),
    )
