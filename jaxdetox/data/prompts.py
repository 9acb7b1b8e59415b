"""Prompt sets for sampling and evaluation: RealToxicityPrompts, ToxiGen (SafeNLP), jsonl/txt.

The paper's code (reference/paper-notes.md §3.3) shuffles RealToxicityPrompts once, takes a
fresh block of 10,000 prompts per iteration and evaluates on a separate block of 1,000; prompts
are at most 30 tokens. Here every prompt gets a stable 63-bit id derived from its identity in
the source (RTP: `filename:begin:end`, the same from prompts.jsonl and from tfds), and the
shuffle orders prompts by a keyed hash of that id, so blocks do not depend on the file's
order, on the source format or on numpy's RNG.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from jaxdetox.data.errors import EmptySplitError
from jaxdetox.data.readers import (
    JsonListSource,
    RecordSource,
    TfdsSource,
    as_float,
    as_text,
    get_field,
    open_source,
)

PAPER_PROMPT_TOKENS = 30
PAPER_BLOCK_SIZE = 10_000
PAPER_EVAL_SIZE = 1_000


def stable_id(key: str) -> int:
    """Non-negative int64 id of a prompt's identity string (blake2b; platform independent)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Prompts as parallel columns; `toxicity` is NaN where the source gives no score."""

    ids: np.ndarray  # int64 [N], stable across sources and file orders
    keys: tuple[str, ...]  # identity strings the ids are derived from
    texts: tuple[str, ...]
    toxicity: np.ndarray  # float32 [N] in [0, 1]
    challenging: np.ndarray  # bool [N] (RTP's `challenging` subset)
    source: str
    meta: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.texts)
        columns = {"ids": self.ids, "keys": self.keys, "toxicity": self.toxicity}
        columns.update({"challenging": self.challenging, **self.meta})
        for name, column in columns.items():
            if len(column) != n:
                raise ValueError(f"PromptSet column '{name}' has {len(column)} rows, texts {n}")
        if n and len(np.unique(self.ids)) != n:
            _, first = np.unique(self.ids, return_index=True)
            dup = sorted(set(range(n)) - set(first.tolist()))[0]
            raise ValueError(
                f"{self.source}: duplicate prompt identity '{self.keys[dup]}' (record {dup}); "
                "prompt ids must be unique"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices: Sequence[int] | np.ndarray) -> PromptSet:
        """The prompts at `indices`, in that order."""
        idx = np.asarray(indices, np.int64)
        pick = lambda column: tuple(column[i] for i in idx)  # noqa: E731
        return dataclasses.replace(
            self,
            ids=self.ids[idx],
            keys=pick(self.keys),
            texts=pick(self.texts),
            toxicity=self.toxicity[idx],
            challenging=self.challenging[idx],
            meta={name: pick(column) for name, column in self.meta.items()},
        )

    def filter(
        self,
        *,
        min_toxicity: float | None = None,
        max_toxicity: float | None = None,
        challenging: bool | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> PromptSet:
        """Prompts with toxicity in [min, max] (unscored prompts fail any bound), the
        `challenging` flag equal to the given value, and `meta` columns equal to the given
        values (e.g. `meta={"split": "train"}`)."""
        keep = np.ones(len(self), bool)
        for name, value in (meta or {}).items():
            if name not in self.meta:
                raise KeyError(f"{self.source}: no meta column '{name}'; has {sorted(self.meta)}")
            keep &= np.array([v == value for v in self.meta[name]], bool)
        with np.errstate(invalid="ignore"):
            if min_toxicity is not None:
                keep &= self.toxicity >= min_toxicity
            if max_toxicity is not None:
                keep &= self.toxicity <= max_toxicity
        if challenging is not None:
            keep &= self.challenging == challenging
        if not keep.any():
            raise EmptySplitError(
                f"{self.source}: no prompt of {len(self)} passes the filter (min_toxicity="
                f"{min_toxicity}, max_toxicity={max_toxicity}, challenging={challenging}, "
                f"meta={meta})"
            )
        return self.take(np.flatnonzero(keep))

    def shuffled(self, seed: int) -> PromptSet:
        """Deterministic shuffle: prompts ordered by blake2b(seed, id)."""
        salt = str(int(seed)).encode()
        keys = [
            hashlib.blake2b(int(i).to_bytes(8, "little"), digest_size=8, key=salt).digest()
            for i in self.ids
        ]
        return self.take(sorted(range(len(self)), key=keys.__getitem__))


@dataclasses.dataclass(frozen=True)
class PromptBlocks:
    """A shuffled prompt set cut into an evaluation block and disjoint per-iteration blocks."""

    ordered: PromptSet
    block_size: int
    eval_size: int

    @property
    def num_train_blocks(self) -> int:
        """How many full training blocks follow the evaluation block."""
        return (len(self.ordered) - self.eval_size) // self.block_size

    def eval_block(self) -> PromptSet:
        """The held-out evaluation prompts (never in a training block)."""
        return self.ordered.take(np.arange(self.eval_size))

    def train_block(self, iteration: int) -> PromptSet:
        """Prompts for sampling in `iteration` (0-based); blocks of different iterations are
        disjoint."""
        if not 0 <= iteration < self.num_train_blocks:
            raise EmptySplitError(
                f"{self.ordered.source}: iteration {iteration} needs training block "
                f"{iteration} of {self.block_size} prompts, but {len(self.ordered)} prompts "
                f"minus {self.eval_size} for evaluation give only {self.num_train_blocks} "
                "blocks; use a smaller block_size or more prompts"
            )
        start = self.eval_size + iteration * self.block_size
        return self.ordered.take(np.arange(start, start + self.block_size))


def split_blocks(
    prompts: PromptSet,
    *,
    seed: int = 0,
    block_size: int = PAPER_BLOCK_SIZE,
    eval_size: int = PAPER_EVAL_SIZE,
) -> PromptBlocks:
    """Shuffle with `seed`, hold out the first `eval_size` prompts, cut the rest into blocks.

    Deviation from the paper's code: its evaluation prompts (10,000–11,000 of the shuffled
    file) overlap the second training block; here evaluation is disjoint from every block.
    """
    if block_size <= 0 or eval_size < 0:
        raise ValueError(f"block_size must be > 0 and eval_size ≥ 0, got {block_size}, {eval_size}")
    if eval_size > len(prompts):
        raise EmptySplitError(
            f"{prompts.source}: eval_size={eval_size} exceeds the {len(prompts)} prompts"
        )
    return PromptBlocks(prompts.shuffled(seed), block_size=block_size, eval_size=eval_size)


# ----------------------------------------------------------------------------- loaders


def _prompt_set(
    rows: list[dict[str, Any]], source: str, meta_fields: Sequence[str] = ()
) -> PromptSet:
    if not rows:
        raise EmptySplitError(f"{source}: no prompts")
    keys = tuple(r["key"] for r in rows)
    return PromptSet(
        ids=np.array([stable_id(k) for k in keys], np.int64),
        keys=keys,
        texts=tuple(r["text"] for r in rows),
        toxicity=np.array([r["toxicity"] for r in rows], np.float32),
        challenging=np.array([r["challenging"] for r in rows], bool),
        source=source,
        meta={f: tuple(r[f] for r in rows) for f in meta_fields},
    )


def _rtp_row(record: Mapping[str, Any], where: str, index: int) -> dict[str, Any]:
    text = as_text(get_field(record, "prompt.text", where), where, "prompt.text")
    toxicity = as_float(get_field(record, "prompt.toxicity", where), where, "prompt.toxicity")
    challenging = bool(get_field(record, "challenging", where))
    try:  # The source document span identifies an RTP prompt in every distribution of it.
        filename = as_text(get_field(record, "filename", where), where, "filename")
        key = f"rtp:{filename}:{int(record['begin'])}:{int(record['end'])}"
    except KeyError:
        key = f"rtp:{index}"
    continuation = record.get("continuation")
    cont_text = continuation.get("text") if isinstance(continuation, Mapping) else None
    cont_text = as_text(cont_text, where, "continuation.text") if cont_text is not None else ""
    return {
        "key": key,
        "text": text,
        "toxicity": toxicity,
        "challenging": challenging,
        "continuation": cont_text,
    }


def _rows(source: RecordSource, parse: Any) -> list[dict[str, Any]]:
    return [parse(source[i], source.describe(i), i) for i in range(len(source))]


def load_rtp(
    path_or_source: str | os.PathLike | RecordSource, *, split: str = "train"
) -> PromptSet:
    """RealToxicityPrompts from its `prompts.jsonl` (or any source of records in that format)."""
    source = (
        path_or_source
        if isinstance(path_or_source, RecordSource)
        else open_source(path_or_source, split=split)
    )
    return _prompt_set(_rows(source, _rtp_row), source.name, meta_fields=("continuation",))


def load_rtp_tfds(data_dir: str | os.PathLike | None = None, *, split: str = "train") -> PromptSet:
    """RealToxicityPrompts from the tfds `real_toxicity_prompts` builder's prepared data."""
    return load_rtp(TfdsSource("real_toxicity_prompts", split=split, data_dir=data_dir))


def load_toxigen(path: str | os.PathLike, *, labels: Sequence[str] | None = None) -> PromptSet:
    """ToxiGen prompts in SafeNLP's `data/toxiGen.json` format (a list of {id, text,
    toxicity_score (1–5), label ('hate'|'neutral'), target_groups}).

    `toxicity` is the annotator score rescaled to [0, 1]; `challenging` marks label 'hate'.
    """
    source = JsonListSource(path)

    def parse(record: Mapping[str, Any], where: str, index: int) -> dict[str, Any]:
        score = as_float(get_field(record, "toxicity_score", where), where, "toxicity_score")
        label = as_text(get_field(record, "label", where), where, "label")
        groups = record.get("target_groups") or []
        return {
            "key": f"toxigen:{record.get('id', index)}",
            "text": as_text(get_field(record, "text", where), where, "text"),
            "toxicity": (score - 1.0) / 4.0,
            "challenging": label == "hate",
            "label": label,
            "target_groups": tuple(groups),
        }

    rows = _rows(source, parse)
    if labels is not None:
        rows = [r for r in rows if r["label"] in set(labels)]
        if not rows:
            raise EmptySplitError(f"{path}: no prompt has a label in {list(labels)}")
    return _prompt_set(rows, source.name, meta_fields=("label", "target_groups"))


def load_prompt_records(
    path_or_source: str | os.PathLike | RecordSource,
    *,
    text_field: str = "text",
    toxicity_field: str | None = None,
    challenging_field: str | None = None,
    id_field: str | None = None,
    meta_fields: Sequence[str] = (),
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
) -> PromptSet:
    """Generic prompts from jsonl/txt/json/parquet/HF/tfds records with the named fields;
    `meta_fields` are kept as extra columns (filterable with `PromptSet.filter(meta=...)`).

    Without `id_field`, a prompt's identity is its text (duplicate texts are merged).
    """
    source = (
        path_or_source
        if isinstance(path_or_source, RecordSource)
        else open_source(path_or_source, split=split, data_dir=data_dir)
    )

    def parse(record: Mapping[str, Any], where: str, index: int) -> dict[str, Any]:
        text = as_text(get_field(record, text_field, where), where, text_field)
        tox = (
            as_float(get_field(record, toxicity_field, where), where, toxicity_field)
            if toxicity_field
            else float("nan")
        )
        chal = bool(get_field(record, challenging_field, where)) if challenging_field else False
        key = f"id:{get_field(record, id_field, where)}" if id_field else f"text:{text}"
        extra = {f: get_field(record, f, where) for f in meta_fields}
        return {"key": key, "text": text, "toxicity": tox, "challenging": chal, **extra}

    rows, seen = [], set()
    for row in _rows(source, parse):
        if row["key"] not in seen:
            seen.add(row["key"])
            rows.append(row)
    return _prompt_set(rows, source.name, meta_fields=meta_fields)


def load_prompts(
    spec: str | os.PathLike,
    *,
    format: Literal["auto", "rtp", "toxigen", "records"] = "auto",
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    **record_fields: Any,
) -> PromptSet:
    """Load prompts from a path or `tfds:NAME`, detecting RTP and SafeNLP ToxiGen layouts.

    `record_fields` (text_field, toxicity_field, ...) go to `load_prompt_records`.
    """
    source = open_source(spec, split=split, data_dir=data_dir)
    if format == "auto":
        first = source[0]
        if isinstance(first.get("prompt"), Mapping) and "text" in first["prompt"]:
            format = "rtp"
        elif isinstance(source, JsonListSource) and "toxicity_score" in first:
            format = "toxigen"
        else:
            format = "records"
    if format == "rtp":
        return load_rtp(source)
    if format == "toxigen":
        return load_toxigen(spec)
    return load_prompt_records(source, **record_fields)


# ----------------------------------------------------------------------- tokenisation


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
