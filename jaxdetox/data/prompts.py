"""Prompts as model input: tokenise a `PromptSet` (prompt_sets.py) with the model's special
prefix and a length limit, and cut the result into left-padded, fixed-shape batches.

The paper's code limits prompts to 30 tokens (`PAPER_PROMPT_TOKENS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from jaxdetox.data.errors import EmptySplitError
from jaxdetox.data.packing import left_pad, positions_from_segments, round_up
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


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """A left-padded batch of prompts (docs/interfaces.md: segment id 0 = padding)."""

    prompt_ids_b: np.ndarray  # int64 [B]
    sample_index_b: np.ndarray  # int32 [B], which of the k samples of the prompt this row is
    tokens_bt: np.ndarray  # int32 [B, T]
    segment_ids_bt: np.ndarray  # int32 [B, T]
    positions_bt: np.ndarray  # int32 [B, T]
    lengths_b: np.ndarray  # int32 [B]
    valid_b: np.ndarray  # bool [B]; False on rows that only fill the last batch
    texts: tuple[str, ...]

    def arrays(self) -> dict[str, np.ndarray]:
        """The numeric fields by name; `corpora.split_host_keys` keeps the ids on the host
        before `corpora.to_global`."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "texts"
        }

    def unpadded_tokens(self) -> list[np.ndarray]:
        """Each row's prompt tokens without padding."""
        return [row[len(row) - n :] for row, n in zip(self.tokens_bt, self.lengths_b)]

    def repeat(self, k: int) -> PromptBatch:
        """Each row k times in a row (for samplers that take one sample per row)."""
        rep = lambda x: np.repeat(x, k, axis=0)  # noqa: E731
        return PromptBatch(
            prompt_ids_b=rep(self.prompt_ids_b),
            sample_index_b=np.tile(np.arange(k, dtype=np.int32), len(self.prompt_ids_b)),
            tokens_bt=rep(self.tokens_bt),
            segment_ids_bt=rep(self.segment_ids_bt),
            positions_bt=rep(self.positions_bt),
            lengths_b=rep(self.lengths_b),
            valid_b=rep(self.valid_b),
            texts=tuple(t for t in self.texts for _ in range(k)),
        )


def prompt_batches(
    prompts: TokenizedPrompts,
    batch_size: int,
    *,
    pad_id: int = 0,
    pad_to: int | None = None,
    pad_multiple: int = 8,
    process_index: int = 0,
    process_count: int = 1,
    skip_ids: Sequence[int] | np.ndarray = (),
) -> Iterator[PromptBatch]:
    """Left-padded batches of `batch_size` prompts (global), this host's rows of each.

    The padded length is `pad_to` if given, else the longest prompt of the global batch
    rounded up to `pad_multiple` (few distinct lengths → few sampler compilations); every host
    computes the same length. The last batch is filled with copies of its first prompt marked
    `valid_b=False`, so shapes stay fixed. `skip_ids` (e.g. prompts already in the sample store)
    are left out, which is how an interrupted sampling stage resumes.
    """
    if batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by process_count {process_count}"
        )
    keep = ~np.isin(prompts.ids, np.asarray(skip_ids, np.int64))
    order = np.flatnonzero(keep)
    host_rows = batch_size // process_count
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        valid = np.zeros(batch_size, bool)
        valid[: len(rows)] = True
        rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
        longest = max(len(prompts.tokens[r]) for r in rows)
        length = pad_to if pad_to is not None else round_up(longest, pad_multiple)
        if longest > length:
            raise ValueError(
                f"{prompts.source}: a prompt has {longest} tokens, more than pad_to={pad_to}"
            )
        mine = rows[process_index * host_rows : (process_index + 1) * host_rows]
        tokens_bt, segment_ids_bt = left_pad([prompts.tokens[r] for r in mine], length, pad_id)
        yield PromptBatch(
            prompt_ids_b=prompts.ids[mine],
            sample_index_b=np.zeros(len(mine), np.int32),
            tokens_bt=tokens_bt,
            segment_ids_bt=segment_ids_bt,
            positions_bt=positions_from_segments(segment_ids_bt),
            lengths_b=np.array([len(prompts.tokens[r]) for r in mine], np.int32),
            valid_b=valid[process_index * host_rows : (process_index + 1) * host_rows],
            texts=tuple(prompts.texts[r] for r in mine),
        )
