"""Data pipelines: prompt sets, fine-tuning corpora (tokenise + pack), and the sample store.

Batches are dicts of numpy arrays with shape-suffixed keys (see `packing.py`):
`tokens_bt`, `segment_ids_bt` (0 = padding, 1..n = documents of a row), `positions_bt`,
`targets_bt` (the token the logits at t predict) and `loss_mask_bt` (weight of that prediction),
so `model(b["tokens_bt"], positions_bt=b["positions_bt"], segment_ids_bt=b["segment_ids_bt"])`
and a loss over `(logits_btv, b["targets_bt"], b["loss_mask_bt"])` need no shifting.
"""

from jaxdetox.data.corpora import (
    HOST_KEYS,
    CorpusConfig,
    corpus_dataset,
    host_info,
    split_host_keys,
    to_global,
)
from jaxdetox.data.errors import (
    DataError,
    EmptySplitError,
    MalformedRecordError,
    MissingFieldError,
    SchemaError,
)
from jaxdetox.data.packing import left_pad, next_token_targets, positions_from_segments
from jaxdetox.data.prompt_sets import (
    PromptBlocks,
    PromptSet,
    load_prompt_records,
    load_prompts,
    load_rtp,
    load_rtp_tfds,
    load_toxigen,
    split_blocks,
)
from jaxdetox.data.prompts import TokenizedPrompts, tokenize_prompts
from jaxdetox.data.readers import open_source
from jaxdetox.data.sample_store import SCHEMA_VERSION, SampleStore
from jaxdetox.data.store_batches import SampleArrays

__all__ = [
    "HOST_KEYS",
    "SCHEMA_VERSION",
    "CorpusConfig",
    "DataError",
    "EmptySplitError",
    "MalformedRecordError",
    "MissingFieldError",
    "PromptBlocks",
    "PromptSet",
    "SampleArrays",
    "SampleStore",
    "SchemaError",
    "TokenizedPrompts",
    "corpus_dataset",
    "host_info",
    "left_pad",
    "load_prompt_records",
    "load_prompts",
    "load_rtp",
    "load_rtp_tfds",
    "load_toxigen",
    "next_token_targets",
    "open_source",
    "positions_from_segments",
    "split_blocks",
    "split_host_keys",
    "tokenize_prompts",
    "to_global",
]
