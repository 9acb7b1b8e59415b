"""A tiny byte-level BPE tokenizer trained offline, wrapped as a transformers fast tokenizer."""

from __future__ import annotations

import functools

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "She said that the weather would be nice tomorrow, and then it rained.",
    "People who ask questions in the meeting get answers from the team.",
    "A long time ago the city built a bridge over the river near the old mill.",
    "Thanks for the help with the report, I owe you one!",
    "Prices rose by 3% in 2024; analysts expect a further rise.",
]


@functools.cache
def make_tokenizer(vocab_size: int = 320, bos_prefix: bool = False):
    """BPE over bytes (any text encodes, decode∘encode is the identity), with <pad>=0, <s>=1,
    </s>=2. `bos_prefix=True` makes it prepend <s> like Llama tokenizers; else it adds nothing,
    like GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    if bos_prefix:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_chat_tokenizer():
    """The test tokenizer plus role / end-of-turn special tokens and a chat template (an
    instruct model's tokenizer in miniature): `<|end|>` closes every turn."""
    import copy

    chat = copy.deepcopy(make_tokenizer(bos_prefix=False))
    chat.add_special_tokens(
        {"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]}
    )
    chat.chat_template = CHAT_TEMPLATE
    return chat


@functools.cache
def make_word_tokenizer(words: tuple[str, ...], eos: str = "</s>"):
    """A word-level tokenizer: id 0 is `eos` (also the pad token, GPT-2 style: no BOS, so a
    prompt is its words' ids), then `words` in order; text is split at whitespace and decoded
    with single spaces. Small enough to enumerate every completion (tests/_enumeration.py)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (
        eos in words
        or len(set(words)) != len(words)
        or any(not w or w.split() != [w] for w in words)
    ):
        raise ValueError(f"make_word_tokenizer: distinct single words without {eos!r} expected")
    vocab = {w: i for i, w in enumerate((eos, *words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)
