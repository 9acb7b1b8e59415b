"""A tiny random Llama with the local test tokenizer, shared by stage and CLI tests."""

from __future__ import annotations

from typing import Any

from tests._tokenizer import make_tokenizer


def tiny_llama(seed: int = 0) -> Any:
    """A 2-layer random Llama `LanguageModel` (BOS-prefixing tokenizer, eos 2, pad 0)."""
    from jaxdetox.models import ModelConfig, random_init

    tok = make_tokenizer(bos_prefix=True)
    config = ModelConfig(
        family="llama", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=128,
        eos_token_id=2, pad_token_id=0, bos_token_id=1,
    )  # fmt: skip
    return random_init(config, seed=seed, tokenizer=tok)


def tiny_chat_llama(seed: int = 0) -> Any:
    """`tiny_llama` with the chat tokenizer (an instruct model's, end-of-turn `<|end|>`)."""
    import dataclasses

    from jaxdetox.models import random_init
    from tests._tokenizer import make_chat_tokenizer

    tok = make_chat_tokenizer()
    config = dataclasses.replace(tiny_llama(seed).config, vocab_size=len(tok))
    return random_init(config, seed=seed, tokenizer=tok)


def tiny_word_llama(words: tuple[str, ...], seed: int = 0, initializer_range: float = 0.2) -> Any:
    """A 2-layer random Llama over `make_word_tokenizer(words)` (eos = pad = 0, no BOS).
    `initializer_range` 0.2 (HF's default is 0.02) makes its next-token distributions peaked
    and context-dependent (logit std ≈ 0.8) rather than near-uniform."""
    from jaxdetox.models import ModelConfig, random_init
    from tests._tokenizer import make_word_tokenizer

    tok = make_word_tokenizer(tuple(words))
    config = ModelConfig(
        family="llama", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64,
        eos_token_id=0, pad_token_id=0, bos_token_id=None, initializer_range=initializer_range,
    )  # fmt: skip
    return random_init(config, seed=seed, tokenizer=tok)


# The small Llama the NADO model and head tests share (GQA, 3 layers, vocabulary 48).
NADO_TEST_LM = dict(
    family="llama", vocab_size=48, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
    head_dim=8, intermediate_size=64, initializer_range=0.2,
)  # fmt: skip


def random_tokens(b: int = 2, t: int = 7, seed: int = 0, vocab: int = 48) -> Any:
    """Random int32 token ids `[b, t]` (a jax array)."""
    import jax.numpy as jnp
    import numpy as np

    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)
