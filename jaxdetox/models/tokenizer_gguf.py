"""The tokenizer stored inside a GGUF file, as a transformers fast tokenizer.

transformers builds it (`gguf_file=`: vocabulary, merges, control tokens as special tokens, the
chat template, BOS/EOS/PAD/UNK). One gap is patched here: llama.cpp names the pre-tokenizer its
vocabulary was trained with (`tokenizer.ggml.pre`), and for names transformers does not know it
falls back to GPT-2's split. For SmolLM2 (`smollm`) that is wrong on non-ASCII numerals such as
"²" or "١": the original tokenizer (and llama.cpp) splits every numeric character off first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import pre_tokenizers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def _digits_then_byte_level() -> pre_tokenizers.PreTokenizer:
    # SmolLM's tokenizer.json: each numeric character (Unicode N*) alone, then GPT-2's byte-level split.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


# llama.cpp `tokenizer.ggml.pre` names -> the pre-tokenizer of the model's original tokenizer.json,
# for the names transformers' GGUF loader lacks.
PRE_TOKENIZERS = {"smollm": _digits_then_byte_level}


def gguf_tokenizer(
    path: str | os.PathLike, *, pre_tokenizer_type: str | None, model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` from a GGUF file; `pre_tokenizer_type` is its `tokenizer.ggml.pre`."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    if pre_tokenizer_type in PRE_TOKENIZERS:
        tokenizer.backend_tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre_tokenizer_type]()
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    return tokenizer
