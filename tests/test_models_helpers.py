"""Tiny random HF PyTorch models saved to temp dirs: the independent reference for parity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

VOCAB = 96

# name -> (transformers config class name, kwargs). Shapes divide 8 devices where useful.
CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", dict(n_embd=32, n_head=4, n_layer=2, n_positions=64)),
    "llama_gqa": (
        "LlamaConfig",
        dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    ),
    "llama_tied": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=64,
            tie_word_embeddings=True,
        ),
    ),
    "llama3_rope": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            rope_theta=500000.0,
            # original_max_position_embeddings small so low/medium/high bands all occur.
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "linear_rope": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            rope_scaling=dict(rope_type="linear", factor=4.0),
        ),
    ),
    "llama_bias_headdim": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            intermediate_size=48,
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
    "mistral_window": (
        "MistralConfig",
        dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            sliding_window=4,
        ),
    ),
}


def make_hf_model(name: str, seed: int = 0, num_layers: int = 2, **overrides) -> torch.nn.Module:
    """A random fp32 HF causal LM for `name` in CONFIGS (biases and norms randomised too)."""
    import transformers

    cls_name, kwargs = CONFIGS[name]
    kwargs = dict(kwargs, vocab_size=VOCAB, **overrides)
    if cls_name == "GPT2Config":
        kwargs.setdefault("n_layer", num_layers)
        kwargs.update(bos_token_id=0, eos_token_id=1)
    else:
        kwargs.setdefault("num_hidden_layers", num_layers)
        kwargs.update(bos_token_id=0, eos_token_id=1, max_position_embeddings=128)
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF inits biases to 0 and norms to 1: perturb so they are tested
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname or "ln_" in pname:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(model: torch.nn.Module, directory: Path) -> Path:
    """save_pretrained into `directory` (safetensors) and return it."""
    model.save_pretrained(str(directory))
    return directory


def hf_logits(model: torch.nn.Module, tokens_bt: np.ndarray, mask_bt: np.ndarray | None = None):
    """Reference logits; with a mask, positions are counted over non-pad tokens (as ours)."""
    tokens = torch.tensor(np.asarray(tokens_bt), dtype=torch.long)
    kwargs = {}
    if mask_bt is not None:
        mask = torch.tensor(np.asarray(mask_bt), dtype=torch.long)
        kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(tokens, **kwargs).logits.float().numpy()


def left_padded_batch(rng: np.random.Generator, batch: int, length: int, pads: list[int]):
    """Random tokens `[B, T]` and segment ids with `pads[b]` leading pad slots (0) per row."""
    tokens = rng.integers(2, VOCAB, (batch, length)).astype(np.int32)
    segments = np.ones((batch, length), np.int32)
    for b, p in enumerate(pads):
        segments[b, :p] = 0
        tokens[b, :p] = 0
    return tokens, segments
