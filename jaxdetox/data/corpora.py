"""Fine-tuning corpora: tokenise, pack to fixed length, iterate deterministically per host.

The pipeline is a grain dataset (source → host shard → per-epoch shuffle → tokenise → pack →
batch), so its iterator state is a small JSON-able dict: `it.get_state()` / `it.set_state()`,
or `grain.checkpoint.CheckpointSave(it)` inside an orbax `CheckpointManager` save, restores
the exact next batch. Each host reads a disjoint interleaved shard of the records
(`records[process_index::process_count]`); `to_global` assembles the hosts' batches into
global arrays.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxdetox.data.errors import EmptySplitError
from jaxdetox.data.packing import finalize_packed_batch, pack_documents
from jaxdetox.data.prompts import special_prefix
from jaxdetox.data.readers import RecordSource, as_text, check_fields, get_field, open_source

if TYPE_CHECKING:
    import grain


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Where a corpus lies and how it becomes batches.

    `source`: a path (.jsonl/.txt/.json/.parquet, a parquet dir, an HF `save_to_disk` dir, a
    tfds prepared-version dir), `tfds:NAME` (with `data_dir`) or `hf:DIR`. `prompt_field`, when
    set, is prepended to `text_field` with no loss on its tokens (supervised pairs).
    `num_epochs=None` repeats forever (multi-host training should count steps, since hosts'
    shards can pack into different numbers of rows).
    """

    source: str
    split: str = "train"
    data_dir: str | None = None
    text_field: str = "text"
    prompt_field: str | None = None
    seq_len: int = 512
    global_batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    add_bos: bool | None = None  # None: follow the tokenizer (BOS for Llama, none for GPT-2)
    add_eos: bool = True
    num_threads: int = 4

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"CorpusConfig.seq_len must be ≥ 2, got {self.seq_len}")
        if self.global_batch_size < 1:
            raise ValueError(
                f"CorpusConfig.global_batch_size must be ≥ 1, got {self.global_batch_size}"
            )


class TokenizeDocument:
    """grain map: record → {tokens int32 [n], loss_mask int32 [n]} with BOS/EOS as configured.

    Keeps one tokenizer copy per thread: HF fast tokenizers are not safe to share across the
    threads grain reads with ("Already borrowed").
    """

    def __init__(self, tokenizer: Any, config: CorpusConfig, source: RecordSource):
        self._tokenizer = tokenizer
        self._local = threading.local()
        self._source = source
        self._config = config
        add_bos = config.add_bos
        if add_bos is None:
            self._prefix = special_prefix(tokenizer)
        else:
            bos = tokenizer.bos_token_id
            if add_bos and bos is None:
                raise ValueError("CorpusConfig.add_bos=True but the tokenizer has no bos_token")
            self._prefix = [bos] if add_bos else []
        eos = tokenizer.eos_token_id
        if config.add_eos and eos is None:
            raise ValueError("CorpusConfig.add_eos=True but the tokenizer has no eos_token")
        self._suffix = [eos] if config.add_eos else []

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _encode(self, text: str) -> list[int]:
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = copy.deepcopy(self._tokenizer)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def __call__(self, item: tuple[int, dict[str, Any]]) -> dict[str, np.ndarray]:
        """Tokenise record `(index, record)`; errors name the record."""
        index, record = item
        where = self._source.describe(index)
        cfg = self._config
        text = as_text(get_field(record, cfg.text_field, where), where, cfg.text_field)
        prompt = []
        if cfg.prompt_field is not None:
            prompt_text = get_field(record, cfg.prompt_field, where)
            prompt = self._encode(as_text(prompt_text, where, cfg.prompt_field))
        body = self._encode(text) + self._suffix
        tokens = self._prefix + prompt + body
        loss_mask = [0] * (len(self._prefix) + len(prompt)) + [1] * len(body)
        return {
            "tokens": np.asarray(tokens, np.int32),
            "loss_mask": np.asarray(loss_mask, np.int32),
        }


def _read_record(source: RecordSource, index: int) -> tuple[int, dict[str, Any]]:
    # Module-level (not a lambda) so the pipeline pickles into grain worker processes.
    return int(index), source[int(index)]


def _non_empty(doc: dict[str, np.ndarray]) -> bool:
    return len(doc["tokens"]) > 0


def host_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), defaulting to JAX's view of the job."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def corpus_dataset(
    config: CorpusConfig,
    tokenizer: Any,
    *,
    source: RecordSource | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """This host's packed batches: dicts of numpy arrays `[global_batch / hosts, seq_len]`
    with keys tokens_bt, segment_ids_bt, positions_bt, targets_bt, loss_mask_bt."""
    import grain

    process_index, process_count = host_info(process_index, process_count)
    if config.global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {config.global_batch_size} is not divisible by the "
            f"{process_count} hosts"
        )
    if source is None:
        source = open_source(config.source, split=config.split, data_dir=config.data_dir)
    fields = [config.text_field] + ([config.prompt_field] if config.prompt_field else [])
    check_fields(source, fields)
    if len(source) < process_count:
        raise EmptySplitError(
            f"{source.name}: {len(source)} records cannot be sharded over {process_count} hosts"
        )
    indices = grain.MapDataset.range(len(source))[process_index::process_count]
    if config.shuffle:
        # Shuffle after sharding and before repeat: grain reshuffles every epoch.
        indices = indices.shuffle(seed=config.seed)
    indices = indices.repeat(config.num_epochs)
    docs = indices.map(functools.partial(_read_record, source))
    docs = docs.map(TokenizeDocument(tokenizer, config, source)).filter(_non_empty)
    read = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=64)
    packed = pack_documents(docs.to_iter_dataset(read), config.seq_len)
    host_batch = config.global_batch_size // process_count
    # Keep the last partial batch (filled with no-loss rows) so a finite epoch loses no token.
    finalize = functools.partial(finalize_packed_batch, batch_size=host_batch)
    return packed.batch(host_batch, drop_remainder=False).map(finalize)


# Bookkeeping columns of sample-store and prompt batches: they name rows for the host
# (stable int64 prompt ids need 63 bits; jax without x64 has 32) and no model step reads them.
HOST_KEYS = ("prompt_ids_b", "sample_index_b")


def split_host_keys(
    batch: Mapping[str, Any], host_keys: Collection[str] = HOST_KEYS
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(model arrays, host bookkeeping)` of a batch: `host_keys` stay numpy on this host."""
    device = {k: v for k, v in batch.items() if k not in host_keys}
    host = {k: v for k, v in batch.items() if k in host_keys}
    return device, host


def to_global(batch: Mapping[str, np.ndarray], sharding: Any) -> dict[str, Any]:
    """Assemble every host's local batch into global `jax.Array`s with the given sharding.

    `sharding` is one `jax.sharding.Sharding` for all arrays or a dict of them by key; the
    global batch dimension is the local one times the number of hosts feeding the mesh.
    Only numeric model arrays are accepted: a 64-bit integer array is carried as 32 bits
    only when every value fits (jax runs without x64), else a ValueError names the key;
    strings and objects are refused. Keep ids on the host with `split_host_keys`.
    """
    import jax

    def one(key: str, value: np.ndarray) -> jax.Array:
        s = sharding[key] if isinstance(sharding, dict) else sharding
        return jax.make_array_from_process_local_data(s, _device_dtype(key, value))

    return {key: one(key, value) for key, value in batch.items()}


def _device_dtype(key: str, value: Any) -> np.ndarray:
    """`value` as an array jax can hold exactly (64-bit ints narrowed only when lossless)."""
    import jax

    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(
            f"to_global: batch key {key!r} has dtype {arr.dtype}; only numeric model arrays go "
            "to devices (keep bookkeeping on the host: split_host_keys)"
        )
    if arr.dtype.kind in "iu" and arr.dtype.itemsize == 8 and not jax.config.jax_enable_x64:
        narrow = np.dtype(arr.dtype.kind + "4")
        info = np.iinfo(narrow)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise ValueError(
                f"to_global: batch key {key!r} ({arr.dtype}) holds values outside {narrow} "
                f"(e.g. {arr.max() if arr.max() > info.max else arr.min()}), which jax without "
                "x64 would truncate; keep it on the host (split_host_keys) or enable jax_enable_x64"
            )
        arr = arr.astype(narrow)
    return arr
