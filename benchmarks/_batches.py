"""Benchmark inputs that need neither JAX nor PyTorch: the GPT-2-small shape, random streams."""

from __future__ import annotations

from typing import Any

import numpy as np

# GPT-2 small as an HF config.json dict (dropout off: both libraries train deterministically).
GPT2_SMALL: dict[str, Any] = {
    "model_type": "gpt2",
    "vocab_size": 50257,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_positions": 1024,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
NADO_LAYERS = 2  # the separate NADO body of the joint-step comparisons
LR = 1e-5


def make_stream(rng: np.random.Generator, batch: int, length: int, vocab: int) -> dict:
    """Random tokens; targets are the next tokens (the last position has none: mask 0)."""
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    mask = np.ones((batch, length), np.float32)
    mask[:, -1] = 0.0
    return dict(
        tokens_bt=tokens,
        segment_ids_bt=np.ones((batch, length), np.int32),
        positions_bt=np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
        targets_bt=targets,
        loss_mask_bt=mask,
    )


def with_labels(stream: dict, rng: np.random.Generator) -> dict:
    """The stream as labelled samples (a 0/1 sequence label each, all scored)."""
    b = stream["tokens_bt"].shape[0]
    return {
        **stream,
        "labels_b": (rng.random(b) < 0.5).astype(np.float32),
        "label_mask_b": np.ones(b, np.float32),
    }
