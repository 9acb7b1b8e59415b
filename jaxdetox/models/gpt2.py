"""GPT-2: learned positions, LayerNorm, gelu_new MLP, fused QKV (HF Conv1D, [in, out]) on import."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdetox.models.config import ModelConfig
from jaxdetox.models.hf import TensorMap, identity_map
from jaxdetox.models.layers import (
    CausalLM,
    DenseMLP,
    LayerNorm,
    PreNormBlock,
    param,
)


class GPT2Block(PreNormBlock):
    """GPT-2 decoder layer: `ln_1` + attention, `ln_2` + gelu_new MLP."""

    norm_cls = LayerNorm
    mlp_cls = DenseMLP


class GPT2(CausalLM):
    """GPT-2 causal LM (see `CausalLM` for the call convention)."""

    block_cls = GPT2Block
    norm_cls = LayerNorm
    uses_rope = False

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.pos_embed = param(
            rngs,
            (config.max_position_embeddings, config.hidden_size),
            ("positions", "embed"),
            config,
        )

    def embed_positions(self, positions_bt: jax.Array) -> jax.Array:
        """Learned absolute position embeddings `[B, T, D]`."""
        return jnp.take(self.pos_embed[...], positions_bt, axis=0)


def hf_tensor_maps(config: ModelConfig) -> list[TensorMap]:
    """HF `GPT2LMHeadModel` tensor names <-> our parameters (Conv1D weights are [in, out])."""
    d, n, h = config.hidden_size, config.num_heads, config.head_dim
    f, v, p = config.intermediate_size, config.vocab_size, config.max_position_embeddings
    pre = "transformer.h.{i}."

    def split_qkv(w: np.ndarray) -> tuple[np.ndarray, ...]:
        # c_attn: [..., 3*d] with q | k | v along the last axis, each [n heads x h].
        w = w.reshape(*w.shape[:-1], 3, n, h)
        return tuple(w[..., j, :, :] for j in range(3))

    def join_qkv(q: np.ndarray, k: np.ndarray, v_: np.ndarray) -> np.ndarray:
        w = np.stack([q, k, v_], axis=-3)
        return w.reshape(*w.shape[:-3], 3 * d)

    maps = [
        identity_map("transformer.wte.weight", (v, d), "embed"),
        identity_map("transformer.wpe.weight", (p, d), "pos_embed"),
        identity_map("transformer.ln_f.weight", (d,), "final_norm.scale"),
        identity_map("transformer.ln_f.bias", (d,), "final_norm.bias"),
        identity_map(pre + "ln_1.weight", (d,), "layers.attn_norm.scale"),
        identity_map(pre + "ln_1.bias", (d,), "layers.attn_norm.bias"),
        identity_map(pre + "ln_2.weight", (d,), "layers.mlp_norm.scale"),
        identity_map(pre + "ln_2.bias", (d,), "layers.mlp_norm.bias"),
        TensorMap(
            pre + "attn.c_attn.weight",
            (d, 3 * d),
            ("layers.attn.wq", "layers.attn.wk", "layers.attn.wv"),
            split_qkv,
            join_qkv,
        ),
        TensorMap(
            pre + "attn.c_attn.bias",
            (3 * d,),
            ("layers.attn.bq", "layers.attn.bk", "layers.attn.bv"),
            split_qkv,
            join_qkv,
        ),
        TensorMap(
            pre + "attn.c_proj.weight",
            (d, d),
            ("layers.attn.wo",),
            lambda w: (w.reshape(n, h, d),),
            lambda w: w.reshape(n * h, d),
        ),
        identity_map(pre + "attn.c_proj.bias", (d,), "layers.attn.bo"),
        identity_map(pre + "mlp.c_fc.weight", (d, f), "layers.mlp.fc"),
        identity_map(pre + "mlp.c_fc.bias", (f,), "layers.mlp.fc_bias"),
        identity_map(pre + "mlp.c_proj.weight", (f, d), "layers.mlp.proj"),
        identity_map(pre + "mlp.c_proj.bias", (d,), "layers.mlp.proj_bias"),
    ]
    if not config.tie_word_embeddings:
        maps.append(identity_map("lm_head.weight", (v, d), "lm_head"))
    return maps


MODEL_CLASS = GPT2
