"""Prompts as model input: tokenise a `PromptSet` (prompt_sets.py) with the model's special
prefix and a length limit (the sampler left-pads and batches them).

The paper's code limits prompts to 30 tokens (`PAPER_PROMPT_TOKENS`).

Instruct models: `chat_template_parts(tokenizer)` cuts the tokenizer's chat template around
the user message into token ids before and after it (the generation prompt, i.e. the
assistant header, included) and finds the end-of-turn token; `tokenize_prompts(...,
chat=parts)` then gives `parts.prefix + text tokens + parts.suffix`, so a sampled completion
is exactly the assistant's turn (its end-of-turn token is a stop token) and the training
masks, which cover the completion, cover exactly the assistant's tokens.
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


_MARKER = "\u2063JAXDETOX_PROMPT\u2063"  # text no template contains


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat template cut around the user message: ids before and after it, stop ids."""

    prefix: tuple[int, ...]  # template start (BOS, system turn, user header)
    suffix: tuple[int, ...]  # end of the user turn + the assistant header (generation prompt)
    stop: tuple[int, ...]  # the end-of-turn token that closes the assistant's turn (if any)

    @property
    def overhead(self) -> int:
        """Template tokens around a prompt's text."""
        return len(self.prefix) + len(self.suffix)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def chat_template_parts(tokenizer: Any, system: str | None = None) -> ChatTemplate:
    """The tokenizer's chat template around one user message (`system`: its system turn;
    None keeps the template's default). Raises ValueError if the tokenizer has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "prompts.chat_template is true but the tokenizer has no chat template "
            "(tokenizer_config.json 'chat_template'); use a base-model config without it"
        )
    head = [] if system is None else [{"role": "system", "content": system}]
    text = _render(tokenizer, [*head, {"role": "user", "content": _MARKER}], True)
    if text.count(_MARKER) != 1:
        raise ValueError("the chat template does not render the user message verbatim once")
    before, after = text.split(_MARKER)

    def ids(t: str) -> tuple[int, ...]:
        return tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) if t else ()

    # The token right after an assistant message is its end-of-turn token when it is special.
    turn = [*head, {"role": "user", "content": "a"}, {"role": "assistant", "content": _MARKER}]
    tail = ids(_render(tokenizer, turn, False).split(_MARKER, 1)[1])
    special = set(getattr(tokenizer, "all_special_ids", ())) | set(
        getattr(tokenizer, "added_tokens_decoder", {})
    )
    stop = tail[:1] if tail and tail[0] in special else ()
    return ChatTemplate(ids(before), ids(after), stop)


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
    chat: ChatTemplate | None = None,
) -> TokenizedPrompts:
    """Tokenise prompts, limiting each to `max_tokens` text tokens (special prefix excluded).

    `truncate_left` keeps the last tokens (the text the continuation follows); `drop` skips
    long prompts, as the paper's code skips prompt groups longer than 30 tokens. With `chat`
    the text is the user message of the chat template (its tokens replace the special prefix).
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be ≥ 1 or None, got {max_tokens}")
    if overflow not in ("truncate_left", "truncate_right", "drop"):
        raise ValueError(f"overflow must be truncate_left, truncate_right or drop, not {overflow}")
    prefix = special_prefix(tokenizer) if add_special_tokens else []
    suffix: list[int] = []
    if chat is not None:
        prefix, suffix = list(chat.prefix), list(chat.suffix)
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
        tokens.append(np.asarray(prefix + list(toks) + suffix, np.int32))
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
