"""Next-token logits warpers: temperature, top-k, top-p (nucleus), and token selection.

Semantics follow transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and
`TopPLogitsWarper`, applied in that order (as `generate` does): removed tokens get `-inf`.
Everything is jit-friendly and batched over leading axes; `top_k` is static (it fixes the
shape of `lax.top_k`), `temperature` and `top_p` may be traced values, so changing them
does not recompile.

Cost: the nucleus needs the vocabulary sorted. When `top_k > 0` the nucleus is computed on
the k survivors only (softmax over the top-k-masked row equals the softmax over those k
values), so the full `O(V log V)` sort happens only for top-p without top-k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdetox.sampling.types import Array


def apply_temperature(logits_bv: Array, temperature: Array | float) -> Array:
    """Divide logits by `temperature` (> 0) in float32."""
    return logits_bv.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)


def _mask_below(logits_bv: Array, threshold_b1: Array) -> Array:
    """Set every logit strictly below the per-row threshold to -inf (ties are kept)."""
    return jnp.where(logits_bv < threshold_b1, -jnp.inf, logits_bv)


def _nucleus_threshold(sorted_desc_bk: Array, top_p: Array | float) -> Array:
    """Smallest logit kept by top-p, given logits sorted descending along the last axis.

    transformers removes a token when the ascending cumulative probability up to and
    including it is `<= 1 - top_p`; equivalently a token is kept when the probability mass
    strictly above it (the exclusive descending cumsum) is `< top_p`. The top token is
    always kept (`min_tokens_to_keep = 1`).
    """
    probs_bk = jax.nn.softmax(sorted_desc_bk, axis=-1)
    mass_above_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk
    keep_count_b = jnp.maximum(jnp.sum(mass_above_bk < top_p, axis=-1), 1)
    return jnp.take_along_axis(sorted_desc_bk, keep_count_b[..., None] - 1, axis=-1)


def top_k_filter(logits_bv: Array, top_k: int) -> Array:
    """Keep the `top_k` largest logits per row (and ties with the k-th); 0 disables."""
    if top_k <= 0 or top_k >= logits_bv.shape[-1]:
        return logits_bv
    kth_b1 = jax.lax.top_k(logits_bv, top_k)[0][..., -1:]
    return _mask_below(logits_bv, kth_b1)


def top_p_filter(logits_bv: Array, top_p: Array | float) -> Array:
    """Keep the smallest set of most likely tokens whose probability reaches `top_p`."""
    sorted_desc_bv = jnp.flip(jnp.sort(logits_bv, axis=-1), axis=-1)
    return _mask_below(logits_bv, _nucleus_threshold(sorted_desc_bv, top_p))


def warp_logits(
    logits_bv: Array,
    *,
    temperature: Array | float = 1.0,
    top_k: int = 0,
    top_p: Array | float = 1.0,
    use_top_p: bool | None = None,
) -> Array:
    """Temperature, then top-k, then top-p, as transformers' `generate` chains them.

    `use_top_p` (static) decides whether the nucleus is computed at all; by default it is
    `top_p < 1`, which needs a concrete `top_p`. Pass it explicitly when `top_p` is traced.
    """
    if use_top_p is None:
        use_top_p = float(top_p) < 1.0
    scaled_bv = apply_temperature(logits_bv, temperature)
    vocab = scaled_bv.shape[-1]
    if 0 < top_k < vocab:
        topk_desc_bk = jax.lax.top_k(scaled_bv, top_k)[0]
        threshold_b1 = topk_desc_bk[..., -1:]
        if use_top_p:
            # The nucleus threshold among the k survivors is >= the k-th value.
            threshold_b1 = _nucleus_threshold(topk_desc_bk, top_p)
        return _mask_below(scaled_bv, threshold_b1)
    if use_top_p:
        return top_p_filter(scaled_bv, top_p)
    return scaled_bv


def select_tokens(keys_b: Array, warped_bv: Array, *, greedy: bool) -> Array:
    """Argmax (greedy) or one categorical draw per row, each row with its own key."""
    if greedy:
        return jnp.argmax(warped_bv, axis=-1).astype(jnp.int32)
    draw = jax.vmap(lambda key, row_v: jax.random.categorical(key, row_v))
    return draw(keys_b, warped_bv).astype(jnp.int32)
