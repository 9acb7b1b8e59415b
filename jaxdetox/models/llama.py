"""Llama family (Llama 2/3, TinyLlama, SmolLM2, Mistral): RMSNorm, RoPE, GQA, SwiGLU."""

from __future__ import annotations

from jaxdetox.models.config import ModelConfig
from jaxdetox.models.hf import TensorMap, identity_map
from jaxdetox.models.layers import CausalLM, GatedMLP, PreNormBlock, RMSNorm


class LlamaBlock(PreNormBlock):
    """Llama decoder layer: RMSNorm + attention (RoPE, GQA), RMSNorm + SwiGLU."""

    norm_cls = RMSNorm
    mlp_cls = GatedMLP


class Llama(CausalLM):
    """Llama-style causal LM (see `CausalLM` for the call convention)."""

    block_cls = LlamaBlock
    norm_cls = RMSNorm
    uses_rope = True


def hf_tensor_maps(config: ModelConfig) -> list[TensorMap]:
    """HF `LlamaForCausalLM` tensor names <-> our parameters (HF Linear weights are [out, in])."""
    d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    f, v = config.intermediate_size, config.vocab_size
    pre = "model.layers.{i}."

    def proj_in(name: str, heads: int, ours: str) -> TensorMap:
        # q/k/v_proj: [heads*h, d] <-> [d, heads, h]
        return TensorMap(
            pre + f"self_attn.{name}.weight",
            (heads * h, d),
            (ours,),
            lambda w: (w.T.reshape(d, heads, h),),
            lambda w: w.reshape(d, heads * h).T,
        )

    def transposed(name: str, shape: tuple[int, int], ours: str) -> TensorMap:
        return TensorMap(name, shape, (ours,), lambda w: (w.T,), lambda w: w.T)

    maps = [
        identity_map("model.embed_tokens.weight", (v, d), "embed"),
        identity_map("model.norm.weight", (d,), "final_norm.scale"),
        identity_map(pre + "input_layernorm.weight", (d,), "layers.attn_norm.scale"),
        identity_map(pre + "post_attention_layernorm.weight", (d,), "layers.mlp_norm.scale"),
        proj_in("q_proj", n, "layers.attn.wq"),
        proj_in("k_proj", k, "layers.attn.wk"),
        proj_in("v_proj", k, "layers.attn.wv"),
        TensorMap(
            pre + "self_attn.o_proj.weight",
            (d, n * h),
            ("layers.attn.wo",),
            lambda w: (w.T.reshape(n, h, d),),
            lambda w: w.reshape(n * h, d).T,
        ),
        transposed(pre + "mlp.gate_proj.weight", (f, d), "layers.mlp.gate"),
        transposed(pre + "mlp.up_proj.weight", (f, d), "layers.mlp.up"),
        transposed(pre + "mlp.down_proj.weight", (d, f), "layers.mlp.down"),
    ]
    if config.attention_bias:
        for name, heads in (("q", n), ("k", k), ("v", k)):
            maps.append(
                TensorMap(
                    pre + f"self_attn.{name}_proj.bias",
                    (heads * h,),
                    (f"layers.attn.b{name}",),
                    lambda b, heads=heads: (b.reshape(heads, h),),
                    lambda b, heads=heads: b.reshape(heads * h),
                )
            )
        maps.append(identity_map(pre + "self_attn.o_proj.bias", (d,), "layers.attn.bo"))
    if config.mlp_bias:
        maps += [
            identity_map(pre + "mlp.gate_proj.bias", (f,), "layers.mlp.gate_bias"),
            identity_map(pre + "mlp.up_proj.bias", (f,), "layers.mlp.up_bias"),
            identity_map(pre + "mlp.down_proj.bias", (d,), "layers.mlp.down_bias"),
        ]
    if not config.tie_word_embeddings:
        maps.append(identity_map("lm_head.weight", (v, d), "lm_head"))
    return maps


MODEL_CLASS = Llama
