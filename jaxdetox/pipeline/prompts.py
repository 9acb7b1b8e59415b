"""The run's prompts and the form of the LLM's input and output: disjoint training blocks
and the held-out set (`prompts:`), their tokenisation with or without the chat template,
the fixed prompt and completion widths of training batches, and the sampling settings
(`sampling:`, with the template's end-of-turn token as a further stop token)."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from jaxdetox.config import PromptsSection, SamplingSection
from jaxdetox.data import PromptBlocks, PromptSet, load_prompt_records, load_prompts, split_blocks
from jaxdetox.data.packing import round_up
from jaxdetox.data.prompts import (
    ChatTemplate,
    TokenizedPrompts,
    chat_template_parts,
    special_prefix,
    tokenize_prompts,
)
from jaxdetox.models.config import ModelConfig
from jaxdetox.sampling import SamplingConfig, special_tokens


def builtin_prompt_set(split: str, kind: str | None) -> PromptSet:
    """The built-in prompts of `split` (train | eval), optionally one `kind`."""
    from jaxdetox import assets

    prompts = load_prompt_records(
        assets.asset_path("prompts.jsonl"), id_field="id", meta_fields=("split", "kind")
    )
    meta = {"split": split} | ({"kind": kind} if kind else {})
    return prompts.filter(meta=meta)


def prompt_blocks(section: PromptsSection) -> tuple[PromptBlocks, PromptSet]:
    """`(training blocks, held-out prompts)` of a `prompts:` section; the built-in set's
    evaluation covers both kinds (reported per kind), whatever the training kind."""
    if section.source == "builtin":
        train = builtin_prompt_set("train", section.kind)
        blocks = split_blocks(train, seed=section.seed, block_size=section.block_size, eval_size=0)
        return blocks, builtin_prompt_set("eval", None)
    blocks = split_blocks(
        load_prompts(section.source),
        seed=section.seed,
        block_size=section.block_size,
        eval_size=section.eval_size,
    )
    return blocks, blocks.eval_block()


class Prompts:
    """The prompts of one run, tokenised for its LLM, and the sampling settings that go
    with them."""

    def __init__(
        self,
        section: PromptsSection,
        sampling: SamplingSection,
        tokenizer: Any,
        lm_config: ModelConfig,
    ) -> None:
        """Prompts of `section` for `tokenizer`; `sampling` and the LLM's special tokens
        (`lm_config`) make the sampling settings. Prompt files are read when first used."""
        self.section, self.sampling = section, sampling
        self.tokenizer, self.lm_config = tokenizer, lm_config

    @cached_property
    def _blocks(self) -> tuple[PromptBlocks, PromptSet]:
        return prompt_blocks(self.section)

    @cached_property
    def chat(self) -> ChatTemplate | None:
        """The chat template around each prompt (`prompts.chat_template`), else None."""
        s = self.section
        return chat_template_parts(self.tokenizer, s.system) if s.chat_template else None

    def chat_for(self, chat: bool | None) -> ChatTemplate | None:
        """The template when `chat` (even if the run's prompts are raw), None when not;
        `chat=None`: the run's own form."""
        if chat is None:
            return self.chat
        if not chat:
            return None
        return self.chat or chat_template_parts(self.tokenizer, self.section.system)

    def tokenize(self, prompts: PromptSet, chat: bool | None = None) -> TokenizedPrompts:
        """`prompts` tokenised (`chat`: force the chat / raw form; None: the run's)."""
        return tokenize_prompts(
            prompts, self.tokenizer, max_tokens=self.section.max_tokens, chat=self.chat_for(chat)
        )

    def train_prompts(self, block: int) -> TokenizedPrompts:
        """Training prompt block `block` (0-based; blocks are disjoint)."""
        return self.tokenize(self._blocks[0].train_block(block))

    def eval_prompt_set(self) -> PromptSet:
        """Held-out prompts (texts and metadata), disjoint from every training block."""
        return self._blocks[1]

    def eval_prompts(self, chat: bool | None = None) -> TokenizedPrompts:
        """Held-out prompts, tokenised (`chat`: force the chat / raw form; None: the run's)."""
        return self.tokenize(self._blocks[1], chat)

    def sampling_config(self, samples: int, chat: bool | None = None) -> SamplingConfig:
        """Sampling settings of sample version `samples` (its own seed); with a chat template
        its end-of-turn token also stops a completion."""
        from jaxdetox.pipeline.recipe import sampling_config

        eos, pad = special_tokens(self.lm_config)
        template = self.chat_for(chat)
        if template is not None:
            eos = eos + tuple(t for t in template.stop if t not in eos)
        return sampling_config(self.sampling, eos_token_ids=eos, pad_token_id=pad, samples=samples)

    @property
    def prompt_len(self) -> int:
        """Fixed prompt width of training batches (max tokens + special prefix or chat template
        tokens, rounded)."""
        extra = self.chat.overhead if self.chat else len(special_prefix(self.tokenizer))
        return round_up(self.section.max_tokens + extra, 8)

    @property
    def completion_len(self) -> int:
        """Fixed completion width of training batches."""
        return round_up(self.sampling.max_new_tokens, 8)
