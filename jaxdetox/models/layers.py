"""Pieces shared by the model families: params with logical axes, norms, RoPE, attention, MLPs,
and `CausalLM`, the base class that stacks a family's block over a `layers` axis and scans it.

Layers are stacked (`nnx.vmap` at construction) and run with `jax.lax.scan`: one block is
traced and compiled once however deep the model is (an unrolled GPT-2-small training step
was 2x slower and compiled 4x slower on CPU). The sampler's decode loop runs the same
blocks unrolled over per-layer weights (`jaxdetox/sampling/decode_form.py`) through the
hooks `attention_context`, `embed_tokens`, `final_norm` and `AttentionContext.write_kv`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdetox.models.attention import attend, current_platform, select_attention
from jaxdetox.models.cache import KVCache
from jaxdetox.models.config import ModelConfig
from jaxdetox.models.lora import merge_layer
from jaxdetox.sharding import constrain

F32 = jnp.float32


def param(
    rngs: nnx.Rngs | None,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    config: ModelConfig,
    init: str = "normal",
) -> nnx.Param:
    """An `nnx.Param` with logical axis names; `init` in {normal, zeros, ones} (HF's init)."""
    dtype = config.jnp_param_dtype
    if init == "normal":
        value = config.initializer_range * jax.random.normal(rngs.params(), shape, F32)
        value = value.astype(dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = jnp.ones(shape, dtype)
    # eager_sharding=False: construction never needs a mesh; placement is done by
    # jaxdetox.sharding (device_put per tensor at load and at `build_model`). `init` is
    # kept so `build_model` can fill an abstract model on the host without compiling RNGs.
    return nnx.Param(value, out_sharding=axes, eager_sharding=False, init=init)


# ----------------------------------------------------------------------------- norms


class RMSNorm(nnx.Module):
    """Root-mean-square norm (Llama), computed in float32."""

    def __init__(self, config: ModelConfig):
        self.eps = config.norm_eps
        self.scale = param(None, (config.hidden_size,), ("embed",), config, init="ones")

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x = x_btd.astype(F32)
        y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(F32)).astype(x_btd.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias (GPT-2), computed in float32."""

    def __init__(self, config: ModelConfig):
        self.eps = config.norm_eps
        self.scale = param(None, (config.hidden_size,), ("embed",), config, init="ones")
        self.bias = param(None, (config.hidden_size,), ("embed",), config, init="zeros")

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x = x_btd.astype(F32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(F32) + self.bias[...].astype(F32)).astype(x_btd.dtype)


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies `[Dh/2]` for the config's rope type (default, linear, llama3)."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    inv = inv.astype(np.float32)
    if config.rope_type == "linear":
        # Linear interpolation divides positions by `factor`; same as dividing frequencies.
        return (inv / config.rope_factor).astype(np.float32)
    if config.rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = config.rope_factor
        lo, hi = config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position_embeddings
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return np.where(medium, blended, scaled).astype(np.float32)
    return inv


def rope_cos_sin(positions_bt: jax.Array, inv_freq_k: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, T, Dh]` (float32) for HF's half-split ("rotate_half") RoPE layout."""
    angles_btk = positions_bt.astype(F32)[..., None] * jnp.asarray(inv_freq_k)[None, None, :]
    angles_bth = jnp.concatenate([angles_btk, angles_btk], axis=-1)
    return jnp.cos(angles_bth), jnp.sin(angles_bth)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """Rotate query/key vectors by their positions' angles (computed in float32)."""
    x = x_btnh.astype(F32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_bth[:, :, None, :] + rotated * sin_bth[:, :, None, :]
    return out.astype(x_btnh.dtype)


# ----------------------------------------------------------------------------- attention


KV = tuple[jax.Array, jax.Array]  # one layer's (k, v) cache


def write_kv_bskh(kv: KV, k_btkh: jax.Array, v_btkh: jax.Array, index: jax.Array) -> tuple:
    """Write `T` new keys/values at slot `index` of a layer's `[B, S, KVH, Dh]` cache;
    returns the new cache and the whole cache as `[B, S, KVH, Dh]` keys and values."""
    k_bskh = jax.lax.dynamic_update_slice(kv[0], k_btkh.astype(kv[0].dtype), (0, index, 0, 0))
    v_bskh = jax.lax.dynamic_update_slice(kv[1], v_btkh.astype(kv[1].dtype), (0, index, 0, 0))
    return (k_bskh, v_bskh), k_bskh, v_bskh


class AttentionContext(NamedTuple):
    """What every layer's attention shares: visibility mask, RoPE angles, cache write slot."""

    mask_bts: jax.Array  # bool: query t may attend to key slot s
    cos_bth: jax.Array | None
    sin_bth: jax.Array | None
    positions_bt: jax.Array  # int32 positions of the new tokens
    kv_segment_bs: jax.Array  # segment ids of every key slot (after this call's write)
    write_index: jax.Array | None  # cache slot of the first new token, None without cache
    # (kv, k_btkh, v_btkh, index) -> (kv', k_bskh, v_bskh): how a layer's cache is stored.
    write_kv: Callable[..., tuple] = write_kv_bskh


def attention_mask(
    q_segment_bt: jax.Array,
    kv_segment_bs: jax.Array,
    q_slot_t: jax.Array,
    kv_slot_s: jax.Array,
    sliding_window: int | None = None,
) -> jax.Array:
    """`[B, T, S]` visibility: same non-zero segment, key slot not after the query slot."""
    same = q_segment_bt[:, :, None] == kv_segment_bs[:, None, :]
    live = (kv_segment_bs != 0)[:, None, :]
    causal = kv_slot_s[None, None, :] <= q_slot_t[None, :, None]
    mask = same & live & causal
    if sliding_window is not None:
        mask &= (q_slot_t[None, :, None] - kv_slot_s[None, None, :]) < sliding_window
    return mask


class Attention(nnx.Module):
    """Multi-head attention with grouped KV heads, optional biases, RoPE and a KV cache."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.config = config
        self.wq = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), config)
        self.wk = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), config)
        self.wv = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), config)
        self.wo = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), config)
        if config.attention_bias:
            self.bq = param(None, (n, h), ("heads", "head_dim"), config, init="zeros")
            self.bk = param(None, (k, h), ("kv_heads", "head_dim"), config, init="zeros")
            self.bv = param(None, (k, h), ("kv_heads", "head_dim"), config, init="zeros")
            self.bo = param(None, (d,), ("embed",), config, init="zeros")

    def _project(self, x_btd: jax.Array, name: str) -> jax.Array:
        """`x @ w` for w = wq / wk / wv `[D, heads, Dh]` (+ bias) -> `[B, T, heads, Dh]`."""
        dt = x_btd.dtype
        w_dnh = getattr(self, "w" + name)[...].astype(dt)
        # A plain [D, N*H] matmul: XLA:CPU keeps the dot on the weights' storage order
        # (the sampler's `[out, in]` decode copies included) instead of copying them.
        y = (x_btd @ w_dnh.reshape(w_dnh.shape[0], -1)).reshape(*x_btd.shape[:2], *w_dnh.shape[1:])
        if self.config.attention_bias:
            y = y + getattr(self, "b" + name)[...].astype(dt)
        return y

    def __call__(
        self, x_btd: jax.Array, ctx: AttentionContext, kv: KV | None
    ) -> tuple[jax.Array, KV | None]:
        """Attend; with `kv` (this layer's cache) write the new keys/values, then read it."""
        cfg, dt = self.config, x_btd.dtype
        q_btnh = constrain(self._project(x_btd, "q"), ("batch", "length", "heads", "head_dim"))
        k_bskh = self._project(x_btd, "k")
        v_bskh = self._project(x_btd, "v")
        if ctx.cos_bth is not None:
            q_btnh = apply_rope(q_btnh, ctx.cos_bth, ctx.sin_bth)
            k_bskh = apply_rope(k_bskh, ctx.cos_bth, ctx.sin_bth)
        if kv is not None:  # keys/values: the whole cache (S slots) instead of the T new ones
            # Read as stored: the cache is in the compute dtype by default; a wider cache is
            # met by promoting the (small) queries and probabilities, never by casting the
            # whole cache in every layer at every step.
            kv, k_bskh, v_bskh = ctx.write_kv(kv, k_bskh, v_bskh, ctx.write_index)
        b, t, n, h = q_btnh.shape
        implementation = select_attention(
            cfg.attention,
            platform=current_platform(),
            dtype=jnp.promote_types(dt, k_bskh.dtype),
            head_dim=h,
            q_len=t,
            kv_len=k_bskh.shape[1],
            cached=kv is not None,
        )
        out_btnh = attend(q_btnh, k_bskh, v_bskh, ctx.mask_bts, implementation)
        y_btd = out_btnh.reshape(b, t, n * h) @ self.wo[...].astype(dt).reshape(n * h, -1)
        if cfg.attention_bias:
            y_btd = y_btd + self.bo[...].astype(dt)
        return y_btd, kv


# ----------------------------------------------------------------------------- MLPs

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
# The dense MLP's nonlinearity recomputed in the backward pass (`jax.checkpoint`): its VJP then
# keeps only its input and output. Differentiated as is, the tanh-GELU saves 5 more [B, T, F]
# intermediates per layer (x², tanh, 1 − tanh², ...); for a GPT-2-small step at B·T = 1024
# that was 0.58 GB of the 3.1 GB of temporaries, and the recomputation is a few elementwise
# ops per element against 2·D FLOPs of matmul. prevent_cse=False: the layers run inside
# `lax.scan`, where CSE cannot undo the remat. The gated MLP (SwiGLU) is left as is: it saves
# only 2 more arrays, and checkpointing it raised XLA's temporaries of a sharded NADO step
# (tests/test_memory_plan.py, 2×2×2 mesh: 1.73 -> 2.30 MB, the planner's margin exceeded).
RECOMPUTED_ACTIVATIONS = {
    name: jax.checkpoint(fn, prevent_cse=False) for name, fn in ACTIVATIONS.items()
}


# `ModelConfig.remat` -> the `jax.checkpoint` policy of each scanned block (None: save
# nothing but the block's inputs, recompute everything).
REMAT: dict[str, Callable | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


class GatedMLP(nnx.Module):
    """SwiGLU feed-forward: `down(act(gate(x)) * up(x))` (Llama)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.config = config
        self.gate = param(rngs, (d, f), ("embed", "mlp"), config)
        self.up = param(rngs, (d, f), ("embed", "mlp"), config)
        self.down = param(rngs, (f, d), ("mlp", "embed"), config)
        if config.mlp_bias:
            self.gate_bias = param(None, (f,), ("mlp",), config, init="zeros")
            self.up_bias = param(None, (f,), ("mlp",), config, init="zeros")
            self.down_bias = param(None, (d,), ("embed",), config, init="zeros")

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dt, bias = x_btd.dtype, self.config.mlp_bias
        gate_btf = jnp.einsum("BTD,DF->BTF", x_btd, self.gate[...].astype(dt))
        up_btf = jnp.einsum("BTD,DF->BTF", x_btd, self.up[...].astype(dt))
        if bias:
            gate_btf = gate_btf + self.gate_bias[...].astype(dt)
            up_btf = up_btf + self.up_bias[...].astype(dt)
        hidden_btf = constrain(
            ACTIVATIONS[self.config.hidden_act](gate_btf) * up_btf, ("batch", "length", "mlp")
        )
        y_btd = jnp.einsum("BTF,FD->BTD", hidden_btf, self.down[...].astype(dt))
        return y_btd + self.down_bias[...].astype(dt) if bias else y_btd


class DenseMLP(nnx.Module):
    """Two-layer feed-forward with biases: `proj(act(fc(x)))` (GPT-2)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.act = config.hidden_act
        self.fc = param(rngs, (d, f), ("embed", "mlp"), config)
        self.fc_bias = param(None, (f,), ("mlp",), config, init="zeros")
        self.proj = param(rngs, (f, d), ("mlp", "embed"), config)
        self.proj_bias = param(None, (d,), ("embed",), config, init="zeros")

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dt = x_btd.dtype
        h_btf = jnp.einsum("BTD,DF->BTF", x_btd, self.fc[...].astype(dt))
        h_btf = RECOMPUTED_ACTIVATIONS[self.act](h_btf + self.fc_bias[...].astype(dt))
        h_btf = constrain(h_btf, ("batch", "length", "mlp"))
        y_btd = jnp.einsum("BTF,FD->BTD", h_btf, self.proj[...].astype(dt))
        return y_btd + self.proj_bias[...].astype(dt)


# ----------------------------------------------------------------------------- base LM


def unembed(h_btd: jax.Array, w_vd: jax.Array, bias_v: jax.Array | None = None) -> jax.Array:
    """Logits `h @ w_vd.T (+ bias_v)` over any leading axes, accumulated and returned in (at
    least) float32; the operands meet in their promoted dtype (cast `w_vd` first to compute
    in the activations' dtype). The LM head, NADO head, samplers and chunked losses share it."""
    out_dtype = jnp.promote_types(jnp.result_type(h_btd, w_vd), F32)
    logits_btv = jnp.einsum("...D,VD->...V", h_btd, w_vd, preferred_element_type=out_dtype)
    return logits_btv if bias_v is None else logits_btv + bias_v.astype(out_dtype)


class PreNormBlock(nnx.Module):
    """Pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`. A family picks
    its norm and MLP by subclassing (Llama: RMSNorm + SwiGLU; GPT-2: LayerNorm + gelu MLP)."""

    norm_cls: ClassVar[type[nnx.Module]]
    mlp_cls: ClassVar[type[nnx.Module]]

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = self.norm_cls(config)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = self.norm_cls(config)
        self.mlp = self.mlp_cls(config, rngs=rngs)

    def __call__(
        self, x_btd: jax.Array, ctx: AttentionContext, kv: KV | None
    ) -> tuple[jax.Array, KV | None]:
        """One decoder layer; returns the new residual stream and this layer's cache."""
        attn_btd, kv = self.attn(self.attn_norm(x_btd), ctx, kv)
        x_btd = x_btd + attn_btd
        return x_btd + self.mlp(self.mlp_norm(x_btd)), kv


def default_positions(segment_ids_bt: jax.Array, offset_b: jax.Array | int = 0) -> jax.Array:
    """Running count of non-padding tokens per row (first real token -> `offset`)."""
    count_bt = jnp.cumsum((segment_ids_bt != 0).astype(jnp.int32), axis=1)
    return jnp.maximum(count_bt - 1, 0) + jnp.asarray(offset_b, jnp.int32).reshape(-1, 1)


class CausalLM(nnx.Module):
    """Token embedding, a scanned stack of `block_cls`, final norm, (tied) vocabulary head.

    Families subclass it and provide `block_cls`, `norm_cls`, `uses_rope` and, if they add
    position embeddings, `embed_positions`.
    """

    block_cls: ClassVar[type[nnx.Module]]
    norm_cls: ClassVar[type[nnx.Module]]
    uses_rope: ClassVar[bool] = True

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        v, d = config.vocab_size, config.hidden_size
        self.embed = param(rngs, (v, d), ("vocab", "embed"), config)
        block_cls = self.block_cls

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(layer_rngs: nnx.Rngs) -> nnx.Module:
            return block_cls(config, rngs=layer_rngs)

        self.layers = make_layers(rngs)
        self.final_norm = self.norm_cls(config)
        if not config.tie_word_embeddings:
            self.lm_head = param(rngs, (v, d), ("vocab", "embed"), config)

    def embed_positions(self, positions_bt: jax.Array) -> jax.Array | None:
        """Learned position embeddings added to the token embeddings (None: the family has none)."""
        return None

    def unembed_weights(self) -> tuple[jax.Array, jax.Array | None]:
        """`(w_vd, bias_v | None)`: logits are `h_btd @ w_vd.T (+ bias_v)` in float32."""
        w = self.embed if self.config.tie_word_embeddings else self.lm_head
        return w[...], None

    def attention_context(
        self,
        shape_bt: tuple[int, int],
        positions_bt: jax.Array | None,
        segment_ids_bt: jax.Array | None,
        cache: KVCache | None,
    ) -> AttentionContext:
        """Mask, RoPE angles, positions and cache slots shared by every layer of one call."""
        cfg = self.config
        b, t = shape_bt
        segment_ids_bt = (
            jnp.ones((b, t), jnp.int32) if segment_ids_bt is None else segment_ids_bt
        ).astype(jnp.int32)
        q_slot_t = jnp.arange(t, dtype=jnp.int32)
        if cache is None:
            offset_b, write_index = 0, None
            kv_segment_bs, kv_slot_s = segment_ids_bt, q_slot_t
        else:  # the T new tokens go to slots [index, index + T)
            offset_b, write_index = jnp.sum(cache.segment_ids != 0, axis=1), cache.index
            q_slot_t = q_slot_t + write_index
            kv_segment_bs = jax.lax.dynamic_update_slice(
                cache.segment_ids, segment_ids_bt, (0, write_index)
            )
            kv_slot_s = jnp.arange(cache.segment_ids.shape[1], dtype=jnp.int32)
        if positions_bt is None:
            positions_bt = default_positions(segment_ids_bt, offset_b)
        positions_bt = positions_bt.astype(jnp.int32)
        mask_bts = attention_mask(
            segment_ids_bt, kv_segment_bs, q_slot_t, kv_slot_s, cfg.sliding_window
        )
        cos = sin = None
        if self.uses_rope:
            cos, sin = rope_cos_sin(positions_bt, rope_inv_freq(cfg))
        return AttentionContext(mask_bts, cos, sin, positions_bt, kv_segment_bs, write_index)

    def embed_tokens(self, tokens_bt: jax.Array, positions_bt: jax.Array) -> jax.Array:
        """Token (+ position) embeddings `[B, T, D]` in the compute dtype."""
        dt = self.config.jnp_dtype
        x_btd = jnp.take(self.embed[...], tokens_bt, axis=0).astype(dt)
        pos_btd = self.embed_positions(positions_bt)
        if pos_btd is not None:
            x_btd = x_btd + pos_btd.astype(dt)
        return constrain(x_btd, ("batch", "length", "embed"))

    def hidden_states(
        self,
        tokens_bt: jax.Array,
        *,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states `[B, T, D]` after the final norm, and the updated cache."""
        ctx = self.attention_context(tokens_bt.shape, positions_bt, segment_ids_bt, cache)
        x_btd = self.embed_tokens(tokens_bt, ctx.positions_bt)
        kv = None if cache is None else (cache.k, cache.v)
        x_btd, kv = self._scan_layers(x_btd, ctx, kv)
        return self.final_norm(x_btd), advance_cache(cache, ctx, kv)

    def _scan_layers(
        self, x_btd: jax.Array, ctx: AttentionContext, kv_stacked: KV | None
    ) -> tuple[jax.Array, KV | None]:
        """The layer stack as one `lax.scan` over the stacked weights (and stacked cache)."""
        t = x_btd.shape[1]
        graphdef, layer_state = nnx.split(self.layers)
        lora_scale = getattr(self, "lora_scale", None)  # set by models.lora.add_adapters

        # The stacked cache rides in the scan carry and each layer writes only its T new
        # slots into it (in place). As scan xs/ys instead, the whole [L, B, S, ...] cache
        # was rewritten every decode step (GPT-2-small, B=32, CPU: 181 -> 145 ms per step
        # at S=50, 1077 -> 527 ms at S=400).
        def run_layer(carry: tuple[jax.Array, Any], layer_in: tuple[Any, Any]) -> tuple:
            x, kv_all = carry
            state, i = layer_in
            if lora_scale is not None:  # W + (α/r)·A·B of this layer only (models/lora.py)
                state = merge_layer(state, lora_scale)
            kv = None if kv_all is None else (kv_all[0][i], kv_all[1][i])
            x, kv = nnx.merge(graphdef, state)(x, ctx, kv)
            if kv_all is not None:
                kv_all = tuple(
                    jax.lax.dynamic_update_slice(
                        stacked, jax.lax.dynamic_slice_in_dim(layer, ctx.write_index, t, 1)[None],
                        (i, 0, ctx.write_index, 0, 0),
                    )
                    for stacked, layer in zip(kv_all, kv)
                )  # fmt: skip
            return (constrain(x, ("batch", "length", "embed")), kv_all), None

        if self.config.remat != "none":
            policy = REMAT[self.config.remat]
            run_layer = jax.checkpoint(run_layer, prevent_cse=False, policy=policy)
        layer_ids = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        (x_btd, kv_stacked), _ = jax.lax.scan(
            run_layer, (x_btd, kv_stacked), (layer_state, layer_ids)
        )
        return x_btd, kv_stacked

    def __call__(
        self,
        tokens_bt: jax.Array,
        *,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Float32 logits `[B, T, V]` and the updated cache (None when called without one)."""
        h_btd, new_cache = self.hidden_states(
            tokens_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt, cache=cache
        )
        w_vd, bias_v = self.unembed_weights()
        logits_btv = unembed(h_btd, w_vd.astype(h_btd.dtype), bias_v)
        return constrain(logits_btv, ("batch", "length", "vocab")), new_cache


def advance_cache(cache: KVCache | None, ctx: AttentionContext, kv: Any) -> KVCache | None:
    """The cache after a call: keys/values `kv`, the new tokens' segment ids and positions
    at slots `[index, index + T)`, and `index + T` (None without a cache)."""
    if cache is None:
        return None
    t = ctx.positions_bt.shape[1]
    positions_bs = jax.lax.dynamic_update_slice(
        cache.positions, ctx.positions_bt, (0, ctx.write_index)
    )
    return KVCache(kv[0], kv[1], ctx.kv_segment_bs, positions_bs, ctx.write_index + t)
