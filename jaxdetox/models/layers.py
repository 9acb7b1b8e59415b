"""Pieces shared by the model families: params with logical axes, norms, RoPE, attention, MLPs,
and `CausalLM`, the base class that stacks a family's block over a `layers` axis and scans it.

Layers are stacked (`nnx.vmap` at construction) and run with `jax.lax.scan`: one block is
traced and compiled once however deep the model is (DESIGN.md §5: an unrolled GPT-2 small
step was 2x slower and compiled 4x slower on CPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdetox.models.cache import KVCache
from jaxdetox.models.config import ModelConfig
from jaxdetox.sharding import constrain

F32 = jnp.float32
# Finite "minus infinity": a query with no visible key (padding) gets a uniform row, not NaN.
MASK_VALUE = float(np.finfo(np.float32).min)


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


class AttentionContext(NamedTuple):
    """What every layer's attention shares: visibility mask, RoPE angles, cache write slot."""

    mask_bts: jax.Array  # bool: query t may attend to key slot s
    cos_bth: jax.Array | None
    sin_bth: jax.Array | None
    write_index: jax.Array | None  # cache slot of the first new token, None without cache
    heads_major_cache: bool = False  # per-layer cache is [B, KVH, S, Dh] (split_cache)


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
        dt = x_btd.dtype
        w_dnh = getattr(self, "w" + name)[...].astype(dt)
        # A plain [D, N*H] matmul: XLA:CPU keeps the dot on the weights' storage order
        # (split_layers' contracting-last copies included) instead of copying them.
        y = (x_btd @ w_dnh.reshape(w_dnh.shape[0], -1)).reshape(*x_btd.shape[:2], *w_dnh.shape[1:])
        if self.config.attention_bias:
            y = y + getattr(self, "b" + name)[...].astype(dt)
        return y

    def __call__(
        self,
        x_btd: jax.Array,
        ctx: AttentionContext,
        kv: tuple[jax.Array, jax.Array] | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attend; with `kv` (this layer's cache `[B, S, KVH, Dh]` x2) write then read it."""
        cfg, dt = self.config, x_btd.dtype
        q_btnh = constrain(self._project(x_btd, "q"), ("batch", "length", "heads", "head_dim"))
        k_btkh = self._project(x_btd, "k")
        v_btkh = self._project(x_btd, "v")
        if ctx.cos_bth is not None:
            q_btnh = apply_rope(q_btnh, ctx.cos_bth, ctx.sin_bth)
            k_btkh = apply_rope(k_btkh, ctx.cos_bth, ctx.sin_bth)
        kv_layout = "BSKH"
        if kv is not None:
            start = (0, ctx.write_index, 0, 0)
            if ctx.heads_major_cache:
                # Per-layer decode cache [B, KVH, S, Dh]: the score and output dots read it
                # without copying (from [B, S, KVH, Dh] XLA transposed the whole cache for
                # every layer and step: ~20 ms of a ~100 ms GPT-2-small B=32 step on CPU).
                k_btkh, v_btkh = k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3)
                start, kv_layout = (0, 0, ctx.write_index, 0), "BKSH"
            k_cache = jax.lax.dynamic_update_slice(kv[0], k_btkh.astype(kv[0].dtype), start)
            v_cache = jax.lax.dynamic_update_slice(kv[1], v_btkh.astype(kv[1].dtype), start)
            kv = (k_cache, v_cache)
            k_btkh, v_btkh = k_cache.astype(dt), v_cache.astype(dt)  # the whole cache
        b, t, n, h = q_btnh.shape
        groups = n // cfg.num_kv_heads
        # Query head j uses KV head j // groups (HF's repeat_kv order).
        q_btkgh = q_btnh.reshape(b, t, cfg.num_kv_heads, groups, h)
        # kv_layout: "BSKH" (stacked cache, no cache) or "BKSH" (per-layer decode cache).
        scores = jnp.einsum(
            f"BTKGH,{kv_layout}->BKGTS", q_btkgh, k_btkh, preferred_element_type=F32
        )
        scores = scores * (1.0 / math.sqrt(h))
        scores = jnp.where(ctx.mask_bts[:, None, None, :, :], scores, MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out_btkgh = jnp.einsum(f"BKGTS,{kv_layout}->BTKGH", probs, v_btkh)
        out_btnh = out_btkgh.reshape(b, t, n, h)
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
        h_btf = ACTIVATIONS[self.act](h_btf + self.fc_bias[...].astype(dt))
        h_btf = constrain(h_btf, ("batch", "length", "mlp"))
        y_btd = jnp.einsum("BTF,FD->BTD", h_btf, self.proj[...].astype(dt))
        return y_btd + self.proj_bias[...].astype(dt)


# ----------------------------------------------------------------------------- base LM


def unembed(h_btd: jax.Array, w_vd: jax.Array, bias_v: jax.Array | None = None) -> jax.Array:
    """Float32 logits `h_btd @ w_vd.T (+ bias_v)`: the LM head, NADO head and samplers share it."""
    logits_btv = jnp.einsum(
        "BTD,VD->BTV", h_btd, w_vd.astype(h_btd.dtype), preferred_element_type=F32
    )
    return logits_btv if bias_v is None else logits_btv + bias_v.astype(F32)


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
        self, x_btd: jax.Array, ctx: AttentionContext, kv: tuple[jax.Array, jax.Array] | None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """One decoder layer; returns the new residual stream and this layer's cache."""
        attn_btd, kv = self.attn(self.attn_norm(x_btd), ctx, kv)
        x_btd = x_btd + attn_btd
        return x_btd + self.mlp(self.mlp_norm(x_btd)), kv


def default_positions(segment_ids_bt: jax.Array, offset_b: jax.Array | int = 0) -> jax.Array:
    """Running count of non-padding tokens per row (first real token -> `offset`)."""
    count_bt = jnp.cumsum((segment_ids_bt != 0).astype(jnp.int32), axis=1)
    return jnp.maximum(count_bt - 1, 0) + jnp.asarray(offset_b, jnp.int32).reshape(-1, 1)


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


def _decode_copy(variable: nnx.Variable, i: int) -> nnx.Variable:
    """Layer `i` of a stacked variable; kernels become `[out, in]` matrices (contracted axis
    innermost), which XLA:CPU's dots at decode shapes (`[32, 768] x W`) run ~25 % faster
    (benchmarks/README.md, sampling). `_logical_view` undoes it."""
    value = variable[...][i]
    k = contracted_axes(variable.get_metadata()["out_sharding"][1:])
    if k is None:
        return variable.replace(value)
    shape = value.shape
    matrix = value.reshape(math.prod(shape[:k]), math.prod(shape[k:])).T
    return variable.replace(matrix, logical_shape=shape)


def _logical_view(variable: nnx.Variable) -> nnx.Variable:
    """A `_decode_copy` kernel in its logical shape: a transpose (+ reshape) that XLA folds
    into the consuming dot, so nothing is copied."""
    shape = variable.get_metadata().get("logical_shape")
    if shape is None:
        return variable
    return variable.replace(variable[...].T.reshape(shape))


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

    def hidden_states(
        self,
        tokens_bt: jax.Array,
        *,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        cache: KVCache | None = None,
        layer_states: Sequence[nnx.State] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states `[B, T, D]` after the final norm, and the updated cache.

        `layer_states` (from `split_layers()`, made once outside a decode loop) runs the
        layers unrolled from per-layer weights; a cache then holds per-layer tuples of
        `k` / `v` (`split_cache`).
        """
        cfg = self.config
        b, t = tokens_bt.shape
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones((b, t), jnp.int32)
        segment_ids_bt = segment_ids_bt.astype(jnp.int32)
        q_slot_t = jnp.arange(t, dtype=jnp.int32)
        if cache is None:
            if positions_bt is None:
                positions_bt = default_positions(segment_ids_bt)
            kv_segment_bs, kv_slot_s, write_index = segment_ids_bt, q_slot_t, None
        else:
            write_index = cache.index
            if positions_bt is None:
                offset_b = jnp.sum(cache.segment_ids != 0, axis=1)
                positions_bt = default_positions(segment_ids_bt, offset_b)
            q_slot_t = q_slot_t + write_index
            kv_segment_bs = jax.lax.dynamic_update_slice(
                cache.segment_ids, segment_ids_bt, (0, write_index)
            )
            kv_slot_s = jnp.arange(cache.segment_ids.shape[1], dtype=jnp.int32)
        positions_bt = positions_bt.astype(jnp.int32)
        mask_bts = attention_mask(
            segment_ids_bt, kv_segment_bs, q_slot_t, kv_slot_s, cfg.sliding_window
        )
        cos = sin = None
        if self.uses_rope:
            cos, sin = rope_cos_sin(positions_bt, rope_inv_freq(cfg))
        ctx = AttentionContext(mask_bts, cos, sin, write_index)

        dt = cfg.jnp_dtype
        x_btd = jnp.take(self.embed[...], tokens_bt, axis=0).astype(dt)
        pos_btd = self.embed_positions(positions_bt)
        if pos_btd is not None:
            x_btd = x_btd + pos_btd.astype(dt)
        x_btd = constrain(x_btd, ("batch", "length", "embed"))

        graphdef, layer_state = nnx.split(self.layers)

        # The stacked cache rides in the scan carry and each layer writes only its T new
        # slots into it (in place). As scan xs/ys instead, the whole [L, B, S, ...] cache
        # was rewritten every decode step (GPT-2-small, B=32, CPU: 181 -> 145 ms per step
        # at S=50, 1077 -> 527 ms at S=400; measured for the sampler, issue 4).
        def run_layer(carry: tuple[jax.Array, Any], layer_in: tuple[Any, Any]) -> tuple:
            x, kv_all = carry
            state, i = layer_in
            kv = None if kv_all is None else (kv_all[0][i], kv_all[1][i])
            x, kv = nnx.merge(graphdef, state)(x, ctx, kv)
            if kv_all is not None:
                kv_all = tuple(
                    jax.lax.dynamic_update_slice(
                        stacked, jax.lax.dynamic_slice_in_dim(layer, write_index, t, 1)[None],
                        (i, 0, write_index, 0, 0),
                    )
                    for stacked, layer in zip(kv_all, kv)
                )  # fmt: skip
            return (constrain(x, ("batch", "length", "embed")), kv_all), None

        if cfg.remat:
            run_layer = jax.checkpoint(run_layer, prevent_cse=False)
        kv_in = None if cache is None else (cache.k, cache.v)
        if layer_states is not None:
            ctx = ctx._replace(heads_major_cache=True)
            x_btd, kv_out = self._unrolled_layers(graphdef, layer_states, x_btd, ctx, kv_in)
        else:
            layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            (x_btd, kv_out), _ = jax.lax.scan(run_layer, (x_btd, kv_in), (layer_state, layer_ids))
        h_btd = self.final_norm(x_btd)

        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                k=kv_out[0],
                v=kv_out[1],
                segment_ids=kv_segment_bs,
                positions=jax.lax.dynamic_update_slice(
                    cache.positions, positions_bt, (0, write_index)
                ),
                index=write_index + t,
            )
        return h_btd, new_cache

    def split_layers(self) -> list[nnx.State]:
        """One parameter state per layer (copies of the stacked weights), for decode loops.

        Inside a loop, XLA:CPU copies a layer's weights out of the stack before each matmul
        (a dot cannot read a dynamic slice in place): for GPT-2 small at batch 32 that is
        ~340 MB of copies per decode step, about as much as the matmuls themselves read.
        Kernels are stored as `[out, in]` matrices (`_decode_copy`) and `hidden_states`
        reads them through a transposed view that XLA folds into the dots. A sampler calls
        this once before its loop and passes the result to `hidden_states`.
        """
        _, state = nnx.split(self.layers)
        return [
            jax.tree.map(lambda v, i=i: _decode_copy(v, i), state, is_leaf=_is_variable)
            for i in range(self.config.num_layers)
        ]

    @staticmethod
    def split_cache(cache: KVCache) -> KVCache:
        """The cache with `k` / `v` as tuples of per-layer `[B, KVH, S, Dh]` arrays (copies,
        heads-major), the form `hidden_states(layer_states=...)` reads and writes in place."""
        return dataclasses.replace(
            cache,
            k=tuple(cache.k[i].transpose(0, 2, 1, 3) for i in range(cache.k.shape[0])),
            v=tuple(cache.v[i].transpose(0, 2, 1, 3) for i in range(cache.v.shape[0])),
        )

    def _unrolled_layers(
        self,
        graphdef: nnx.GraphDef,
        layer_states: Sequence[nnx.State],
        x_btd: jax.Array,
        ctx: AttentionContext,
        kv_in: tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]] | None,
    ) -> tuple[jax.Array, tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]] | None]:
        """The layer stack as a Python loop over per-layer weights and per-layer caches."""
        if len(layer_states) != self.config.num_layers:
            raise ValueError(
                f"layer_states: expected {self.config.num_layers} per-layer states "
                f"(CausalLM.split_layers()), got {len(layer_states)}"
            )
        if kv_in is not None and not isinstance(kv_in[0], tuple):
            raise ValueError(
                "layer_states needs a per-layer cache: pass CausalLM.split_cache(cache)"
            )
        ks, vs = [], []
        for i, state in enumerate(layer_states):
            kv = None if kv_in is None else (kv_in[0][i], kv_in[1][i])
            # The barrier ties the weights to this step's activations so XLA cannot hoist
            # the (free, folded-into-the-dot) transposed view out of a decode loop as a
            # materialised copy in the logical layout.
            state, x_btd = jax.lax.optimization_barrier((state, x_btd))
            state = jax.tree.map(_logical_view, state, is_leaf=_is_variable)
            x_btd, kv = nnx.merge(graphdef, state)(x_btd, ctx, kv)
            x_btd = constrain(x_btd, ("batch", "length", "embed"))
            if kv is not None:
                ks.append(kv[0])
                vs.append(kv[1])
        return x_btd, (None if kv_in is None else (tuple(ks), tuple(vs)))

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
        logits_btv = unembed(h_btd, *self.unembed_weights())
        return constrain(logits_btv, ("batch", "length", "vocab")), new_cache
