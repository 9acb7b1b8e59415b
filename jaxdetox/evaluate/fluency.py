"""Fluency and diversity of generations, and perplexity on held-out text.

- `distinct_n`: distinct-n (Li et al. 2016, as in the DExperts / RTP evaluations): per
  prompt, unique n-grams over all n-grams of its k completions; averaged over prompts.
- `text_windows`: held-out text as fixed-shape `[B, T]` rows of non-overlapping windows
  (each window restarts its positions; the first token of a window is context only).
- `nll_sums`: the pure function a runner jits: Σ NLL and Σ tokens of a batch under an LLM,
  from hidden states in token chunks (no `[B, T, V]` logits). Perplexity = exp(Σ NLL / Σ n).
- `continuation_perplexity`: perplexity of completions given their prompts under any
  `LanguageModel` — re-tokenised with *its* tokenizer, so the fluency model (the paper's
  practice: a larger model than the one evaluated) may come from another family.
- `guided_nll_sums`: the same under NADO-guided decoding's distribution q = guided(LLM, NADO).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdetox import losses
from jaxdetox.train.state import Models
from jaxdetox.train.steps import lm_hidden, teacher_features


def distinct_n(completions_by_prompt: Iterable[Sequence[Sequence[int]]], n: int) -> float:
    """Mean over prompts of |unique n-grams| / |n-grams| across that prompt's completions
    (token ids); prompts whose completions hold no n-gram are skipped (NaN if none has)."""
    scores = []
    for completions in completions_by_prompt:
        grams = [tuple(c[i : i + n]) for c in completions for i in range(len(c) - n + 1)]
        if grams:
            scores.append(len(set(grams)) / len(grams))
    return float(np.mean(scores)) if scores else float("nan")


def text_windows(
    token_docs: Sequence[Sequence[int]], seq_len: int, batch_size: int
) -> list[dict[str, np.ndarray]]:
    """Documents cut into non-overlapping `seq_len` windows, batched `[batch_size, seq_len]`
    (short rows and filler rows are padding: segment id 0, no loss)."""
    windows = [
        np.asarray(doc[i : i + seq_len], np.int32)
        for doc in token_docs
        for i in range(0, max(len(doc) - 1, 1), seq_len)
        if len(doc[i : i + seq_len]) >= 2
    ]
    batches = []
    for start in range(0, len(windows), batch_size):
        rows = windows[start : start + batch_size]
        tokens = np.zeros((batch_size, seq_len), np.int32)
        segments = np.zeros((batch_size, seq_len), np.int32)
        for b, w in enumerate(rows):
            tokens[b, : len(w)] = w
            segments[b, : len(w)] = 1
        targets = np.concatenate([tokens[:, 1:], np.zeros((batch_size, 1), np.int32)], axis=1)
        mask = (segments != 0) & (
            np.concatenate([segments[:, 1:], np.zeros((batch_size, 1), np.int32)], axis=1) != 0
        )
        batches.append(
            {
                "tokens_bt": tokens,
                "segment_ids_bt": segments,
                "positions_bt": np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32),
                "targets_bt": targets,
                "loss_mask_bt": mask.astype(np.float32),
            }
        )
    return batches


def nll_sums(params: Any, batch: dict[str, dict[str, jax.Array]], *, graphdef: Any) -> dict:
    """`{"nll_sum", "tokens"}` of every stream of a batch under the LLM `(graphdef, params)`."""
    nll_sum, tokens = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    for stream in batch.values():
        h_btd, head = lm_hidden(graphdef, params, stream)
        mask = stream["loss_mask_bt"]
        nll = losses.chunked_nll(h_btd, head, stream["targets_bt"], mask)
        nll_sum += jnp.sum(nll * mask)
        tokens += jnp.sum(mask)
    return {"nll_sum": nll_sum, "tokens": tokens}


def continuation_perplexity(
    lm: Any, prompts: Sequence[str], completions: Sequence[str], *, batch_size: int = 16
) -> float:
    """exp(−Σ log p(completion | prompt) / Σ completion tokens) under `lm`, each text pair
    tokenised by `lm.tokenizer` as lm-eval splits it; empty completions are left out."""
    from jaxdetox.evaluate.loglikelihood import encode_pair, score_continuations

    pairs = [encode_pair(lm.tokenizer, p, c) for p, c in zip(prompts, completions) if c]
    pairs = [(ctx, cont) for ctx, cont in pairs if cont]
    if not pairs:
        return float("nan")
    scores = score_continuations(lm, pairs, batch_size=batch_size)
    tokens = sum(len(cont) for _, cont in pairs)
    return float(np.exp(-sum(logp for logp, _ in scores) / tokens))


def guided_nll_sums(
    params: tuple[Any, Any],
    batch: dict[str, dict[str, jax.Array]],
    *,
    models: Models,
    alpha: float,
) -> dict:
    """`{"nll_sum", "tokens"}` of a batch under q ∝ p_LLM · R_φ^α (`params` = (LLM, NADO))."""
    lm_params, nado_params = params
    nll_sum, tokens = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    for stream in batch.values():
        t = teacher_features(models, lm_params, nado_params, stream)
        mask = stream["loss_mask_bt"]
        nll = losses.chunked_guided_nll(
            t.h_ref, t.ref_head, t.h_nado, t.nado_head, stream["targets_bt"], mask, alpha=alpha
        )
        nll_sum += jnp.sum(nll * mask)
        tokens += jnp.sum(mask)
    return {"nll_sum": nll_sum, "tokens": tokens}
