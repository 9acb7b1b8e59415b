"""Prompts as model input: tokenise a `PromptSet` (prompt_sets.py) with the model's special
prefix and a length limit (the sampler left-pads and batches them).

The paper's code limits prompts to 30 tokens (`PAPER_PROMPT_TOKENS`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from jaxdetox.data.errors import EmptySplitError
from jaxdetox.data.prompt_sets import PromptSet

PAPER_PROMPT_TOKENS = 30


def special_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts before the text (e.g. Llama's BOS; none for GPT-2)."""
    probe = "a"
    with_special = list(tokenizer(probe)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


@dataclasses.dataclass(frozen=True)
class TokenizedPrompts:
    """Prompts as token ids (special prefix included), ready to batch."""

    ids: np.ndarray  # int64 [N]
    tokens: tuple[np.ndarray, ...]  # int32 per prompt
    texts: tuple[str, ...]  # the text the tokens encode (after truncation)
    num_truncated: int
    num_dropped: int
    source: str

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize_prompts(
    prompts: PromptSet,
    tokenizer: Any,
    *,
    max_tokens: int | None = PAPER_PROMPT_TOKENS,
    overflow: Literal["truncate_left", "truncate_right", "drop"] = "truncate_left",
    add_special_tokens: bool = True,
) -> TokenizedPrompts:
    """Tokenise prompts, limiting each to `max_tokens` text tokens (special prefix excluded).

    `truncate_left` keeps the last tokens (the text the continuation follows); `drop` skips
    long prompts, as the paper's code skips prompt groups longer than 30 tokens.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be ≥ 1 or None, got {max_tokens}")
    if overflow not in ("truncate_left", "truncate_right", "drop"):
        raise ValueError(f"overflow must be truncate_left, truncate_right or drop, not {overflow}")
    prefix = special_prefix(tokenizer) if add_special_tokens else []
    encoded = tokenizer(list(prompts.texts), add_special_tokens=False)["input_ids"]
    ids, tokens, texts, truncated, dropped = [], [], [], 0, 0
    for pid, text, toks in zip(prompts.ids, prompts.texts, encoded):
        if max_tokens is not None and len(toks) > max_tokens:
            if overflow == "drop":
                dropped += 1
                continue
            toks = toks[-max_tokens:] if overflow == "truncate_left" else toks[:max_tokens]
            text = tokenizer.decode(toks)
            truncated += 1
        if not toks and not prefix:
            dropped += 1  # an empty prompt with no BOS gives the model nothing to condition on
            continue
        ids.append(pid)
        tokens.append(np.asarray(prefix + list(toks), np.int32))
        texts.append(text)
    if not tokens:
        raise EmptySplitError(
            f"{prompts.source}: all {len(prompts)} prompts were dropped (max_tokens={max_tokens}, "
            f"overflow={overflow})"
        )
    return TokenizedPrompts(
        ids=np.asarray(ids, np.int64),
        tokens=tuple(tokens),
        texts=tuple(texts),
        num_truncated=truncated,
        num_dropped=dropped,
        source=prompts.source,
    )
