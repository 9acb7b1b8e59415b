"""Persistent store of the pipeline's samples and labels, per iteration, in parquet.

Layout (`SCHEMA_VERSION` in `store.json` and in every file's metadata):

    root/store.json
    root/iter_0003/samples/<chunk>.parquet            one committed chunk of samples
    root/iter_0003/labels/<oracle>/<chunk>.parquet     oracle scores, joined by sample key
    root/iter_0003/<stage>.done.json                   stage markers (`mark_done`)

Append-only and crash-safe: a chunk is written to a dot-prefixed temporary name in the same
directory, flushed, fsynced and renamed into place, so readers (which ignore dot-files) see a
chunk entirely or not at all. A sample's key is (prompt_id, sample_index); resuming a stage
means skipping the prompts `done_prompt_ids` lists (sampling) or the keys `unlabelled` does
not list (labelling). `batches()` reads an iteration back as fixed-shape numpy batches for the
NADO and LM steps (conventions in `packing.py`).

Multi-host: each host commits its own rows under chunk names that include its process index,
every host reads all committed chunks (a shared directory) and `batches()` gives each host a
disjoint share with the same number of batches; `corpora.to_global` makes global arrays.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

from jaxdetox.data.errors import DataError, EmptySplitError, SchemaError
from jaxdetox.data.packing import next_token_targets, positions_from_segments, round_up

if TYPE_CHECKING:
    import grain

SCHEMA_VERSION = 1
FORMAT_NAME = "jaxdetox.sample_store"
_META_KEY = b"jaxdetox"
_KEY = ["prompt_id", "sample_index"]
_LOGPROB_COLUMNS = ("sampling_logprobs", "model_logprobs", "base_logprobs")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

SAMPLES_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("sample_index", pa.int32()),
        ("prompt_tokens", pa.list_(pa.int32())),
        ("completion_tokens", pa.list_(pa.int32())),
        ("prompt_text", pa.string()),
        ("completion_text", pa.string()),
        # Per completion token: log-prob under the sampling distribution (temperature, top-k/p)
        # and under the untempered model; importance weights need both.
        ("sampling_logprobs", pa.list_(pa.float32())),
        ("model_logprobs", pa.list_(pa.float32())),
        # Guided decoding only: the log-prob under the base LM alone (else null).
        ("base_logprobs", pa.list_(pa.float32())),
    ]
)
LABELS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("sample_index", pa.int32()),
        ("toxicity", pa.float32()),
        ("ok", pa.bool_()),  # False: the oracle failed; never to be counted as clean
    ]
)


def _check_name(kind: str, name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"{kind} name {name!r} must match {_NAME_RE.pattern}")
    return name


def _ragged(
    name: str, values: Any, lengths: np.ndarray | None, n: int, dtype: Any
) -> list[np.ndarray] | None:
    """Rows of a per-token field: from a right-padded 2-D array + lengths, or ragged rows."""
    if values is None:
        return None
    if hasattr(values, "shape"):  # numpy or jax array
        arr = np.asarray(values)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise ValueError(f"{name}: expected [{n}, length] or {n} rows, got shape {arr.shape}")
        if lengths is None:
            raise ValueError(f"{name}: a padded 2-D array needs completion lengths")
        if np.any(lengths > arr.shape[1]):
            raise ValueError(f"{name}: a length exceeds the padded width {arr.shape[1]}")
        return [arr[i, : lengths[i]].astype(dtype) for i in range(n)]
    rows = [np.asarray(v, dtype) for v in values]
    if len(rows) != n:
        raise ValueError(f"{name}: expected {n} rows, got {len(rows)}")
    return rows


def _with_row(table: pa.Table) -> pa.Table:
    return table.append_column("__row", pa.array(np.arange(table.num_rows, dtype=np.int64)))


def _atomic_write(path: epath.Path, table: pa.Table, metadata: Mapping[str, Any]) -> None:
    """Write `table` with `metadata` so that `path` appears complete or not at all."""
    if path.exists():
        raise FileExistsError(f"{path}: already committed (the store is append-only)")
    meta = dict(table.schema.metadata or {})
    meta[_META_KEY] = json.dumps({"schema_version": SCHEMA_VERSION, **metadata}).encode()
    table = table.replace_schema_metadata(meta)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with tmp.open("wb") as f:
            pq.write_table(table, f)
            f.flush()
            try:
                os.fsync(f.fileno())  # local files; object stores commit on close
            except (AttributeError, OSError, ValueError):
                pass
        _commit(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _commit(tmp: epath.Path, path: epath.Path) -> None:
    """Move `tmp` to `path` atomically, refusing to replace a chunk another writer committed."""
    if "://" in str(path):  # object stores: the upload itself is atomic
        tmp.replace(path)
        return
    try:
        os.link(os.fspath(tmp), os.fspath(path))  # fails if `path` exists (no clobber)
    except FileExistsError:
        raise FileExistsError(f"{path}: already committed (the store is append-only)") from None
    except OSError:  # a file system without hard links: plain atomic rename
        tmp.replace(path)
        return
    tmp.unlink()


def _fsync_dir(directory: epath.Path) -> None:
    # The rename is durable only once the directory entry is on disk (POSIX).
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except (OSError, TypeError):
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: epath.Path, data: Mapping[str, Any]) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)
    _fsync_dir(path.parent)


def _read_table(path: epath.Path, schema: pa.Schema) -> pa.Table:
    with path.open("rb") as f:
        table = pq.read_table(f)
    raw = (table.schema.metadata or {}).get(_META_KEY)
    version = json.loads(raw).get("schema_version") if raw else None
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"{path}: written with sample-store schema version {version}, this code reads "
            f"version {SCHEMA_VERSION}"
        )
    missing = set(schema.names) - set(table.schema.names)
    if missing:
        raise SchemaError(f"{path}: missing columns {sorted(missing)}; has {table.schema.names}")
    return table.select(schema.names).cast(schema)


class SampleStore:
    """Per-iteration samples and labels under one root directory (local path or gs://)."""

    def __init__(self, root: str | os.PathLike):
        self.root = epath.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = self.root / "store.json"
        if manifest.exists():
            info = json.loads(manifest.read_text())
            if info.get("format") != FORMAT_NAME or info.get("schema_version") != SCHEMA_VERSION:
                raise SchemaError(
                    f"{manifest}: format {info.get('format')!r} version "
                    f"{info.get('schema_version')}; expected {FORMAT_NAME!r} version "
                    f"{SCHEMA_VERSION}"
                )
        else:
            _write_json_atomic(
                manifest,
                {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "created": time.time()},
            )

    # ------------------------------------------------------------------ paths & listing

    def _iter_dir(self, iteration: int) -> epath.Path:
        if iteration < 0:
            raise ValueError(f"iteration must be ≥ 0, got {iteration}")
        return self.root / f"iter_{iteration:04d}"

    def _samples_dir(self, iteration: int) -> epath.Path:
        return self._iter_dir(iteration) / "samples"

    def _labels_dir(self, iteration: int, oracle: str) -> epath.Path:
        return self._iter_dir(iteration) / "labels" / _check_name("oracle", oracle)

    @staticmethod
    def _committed(directory: epath.Path) -> list[epath.Path]:
        if not directory.exists():
            return []
        return sorted(
            p for p in directory.iterdir() if p.name.endswith(".parquet") and p.name[0] != "."
        )

    def iterations(self) -> list[int]:
        """Iterations that have at least one committed sample chunk."""
        found = []
        for p in self.root.iterdir() if self.root.exists() else []:
            m = re.fullmatch(r"iter_(\d+)", p.name)
            if m and self._committed(p / "samples"):
                found.append(int(m.group(1)))
        return sorted(found)

    def chunks(self, iteration: int) -> list[str]:
        """Names of the committed sample chunks of `iteration`."""
        return [p.name[: -len(".parquet")] for p in self._committed(self._samples_dir(iteration))]

    def cleanup(self) -> int:
        """Delete temporary files left by crashed writers; returns how many. Run it only when
        no writer is active (a live writer's temporary file looks the same)."""
        removed, stack = 0, [self.root]
        while stack:  # explicit walk: epath refuses recursive globs (costly on object stores)
            for p in stack.pop().iterdir():
                if p.is_dir():
                    stack.append(p)
                elif p.name.startswith(".") and ".tmp-" in p.name:
                    p.unlink()
                    removed += 1
        return removed

    # ------------------------------------------------------------------------ writing

    def write_samples(
        self,
        iteration: int,
        chunk: str,
        *,
        prompt_ids: Sequence[int] | np.ndarray,
        sample_index: Sequence[int] | np.ndarray,
        prompt_tokens: Any,
        completion_tokens: Any,
        completion_lengths: Sequence[int] | np.ndarray | None = None,
        prompt_texts: Sequence[str],
        completion_texts: Sequence[str],
        sampling_logprobs: Any = None,
        model_logprobs: Any = None,
        base_logprobs: Any = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Commit one chunk of N samples; returns its path.

        Per-token fields (`completion_tokens`, `*_logprobs`) are ragged rows or right-padded
        `[N, C]` arrays with `completion_lengths`; `prompt_tokens` are ragged rows (e.g.
        `TokenizedPrompts.tokens`). `metadata` (JSON-able: model step, sampler settings)
        is kept in the file.
        """
        prompt_ids = np.asarray(prompt_ids, np.int64)
        n = len(prompt_ids)
        if n == 0:
            raise ValueError(f"write_samples(iteration={iteration}, chunk={chunk!r}): no samples")
        lengths = None if completion_lengths is None else np.asarray(completion_lengths, np.int64)
        completions = _ragged("completion_tokens", completion_tokens, lengths, n, np.int32)
        if lengths is None:
            lengths = np.array([len(c) for c in completions])
        columns: dict[str, Any] = {
            "prompt_id": prompt_ids,
            "sample_index": np.asarray(sample_index, np.int32),
            "prompt_tokens": _ragged("prompt_tokens", prompt_tokens, None, n, np.int32),
            "completion_tokens": completions,
            "prompt_text": list(prompt_texts),
            "completion_text": list(completion_texts),
        }
        for name, values in (
            ("sampling_logprobs", sampling_logprobs),
            ("model_logprobs", model_logprobs),
            ("base_logprobs", base_logprobs),
        ):
            rows = _ragged(name, values, lengths, n, np.float32)
            if rows is not None and any(len(r) != len(c) for r, c in zip(rows, completions)):
                raise ValueError(f"{name}: per-row lengths differ from completion_tokens")
            columns[name] = rows
        for name, column in columns.items():
            if column is not None and len(column) != n:
                raise ValueError(f"{name}: expected {n} rows, got {len(column)}")
        table = pa.table(
            {
                name: pa.array(column, type=SAMPLES_SCHEMA.field(name).type)
                if column is not None
                else pa.nulls(n, SAMPLES_SCHEMA.field(name).type)
                for name, column in columns.items()
            },
            schema=SAMPLES_SCHEMA,
        )
        if table.group_by(_KEY).aggregate([]).num_rows != n:
            raise ValueError(f"chunk {chunk!r}: duplicate (prompt_id, sample_index) keys")
        directory = self._samples_dir(iteration)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{_check_name('chunk', chunk)}.parquet"
        _atomic_write(path, table, {"iteration": iteration, "chunk": chunk, **(metadata or {})})
        return str(path)

    def write_labels(
        self,
        iteration: int,
        chunk: str,
        *,
        oracle: str,
        prompt_ids: Sequence[int] | np.ndarray,
        sample_index: Sequence[int] | np.ndarray,
        toxicity: Sequence[float] | np.ndarray,
        ok: Sequence[bool] | np.ndarray,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Commit oracle scores for some samples of `iteration` (keys must exist in samples
        when read back); failed scores carry `ok=False`."""
        table = pa.table(
            {
                "prompt_id": np.asarray(prompt_ids, np.int64),
                "sample_index": np.asarray(sample_index, np.int32),
                "toxicity": np.asarray(toxicity, np.float32),
                "ok": np.asarray(ok, bool),
            },
            schema=LABELS_SCHEMA,
        )
        if table.num_rows == 0:
            raise ValueError(f"write_labels(iteration={iteration}, chunk={chunk!r}): no labels")
        directory = self._labels_dir(iteration, oracle)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{_check_name('chunk', chunk)}.parquet"
        _atomic_write(
            path,
            table,
            {"iteration": iteration, "chunk": chunk, "oracle": oracle, **(metadata or {})},
        )
        return str(path)

    def mark_done(self, iteration: int, stage: str, info: Mapping[str, Any] | None = None) -> None:
        """Record that `stage` (e.g. 'sampled', 'labelled-default') of `iteration` finished."""
        directory = self._iter_dir(iteration)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{_check_name('stage', stage)}.done.json"
        _write_json_atomic(path, {"stage": stage, "time": time.time(), **(info or {})})

    def is_done(self, iteration: int, stage: str) -> bool:
        """Whether `mark_done(iteration, stage)` was committed."""
        return (self._iter_dir(iteration) / f"{_check_name('stage', stage)}.done.json").exists()

    # ------------------------------------------------------------------------ reading

    def _concat(self, files: list[epath.Path], schema: pa.Schema, what: str) -> pa.Table:
        if not files:
            return schema.empty_table()
        table = pa.concat_tables([_read_table(f, schema) for f in files])
        if table.group_by(_KEY).aggregate([]).num_rows != table.num_rows:
            raise DataError(f"{what}: the same (prompt_id, sample_index) in several chunks")
        return table.sort_by([(k, "ascending") for k in _KEY])

    def read_samples(self, iteration: int) -> pa.Table:
        """All committed samples of `iteration`, sorted by (prompt_id, sample_index)."""
        directory = self._samples_dir(iteration)
        return self._concat(self._committed(directory), SAMPLES_SCHEMA, str(directory))

    def read_labels(self, iteration: int, oracle: str) -> pa.Table:
        """All committed labels of `iteration` from `oracle`, sorted by sample key."""
        directory = self._labels_dir(iteration, oracle)
        return self._concat(self._committed(directory), LABELS_SCHEMA, str(directory))

    def read(self, iteration: int, oracle: str | None = None) -> pa.Table:
        """Samples joined with `oracle`'s labels; unlabelled samples get toxicity NaN, ok False."""
        samples = self.read_samples(iteration)
        if oracle is None:
            return samples
        labels = self.read_labels(iteration, oracle)
        # Join on the keys only (arrow cannot carry list columns through a join), then attach.
        keys = _with_row(samples.select(_KEY))
        joined = keys.join(labels, keys=_KEY, join_type="left outer").sort_by("__row")
        if joined.num_rows != samples.num_rows:
            raise DataError(f"iteration {iteration}: labels of {oracle!r} have duplicate keys")
        extra = labels.num_rows - pa.compute.sum(joined["ok"].is_valid()).as_py()
        if extra:
            raise DataError(
                f"iteration {iteration}: {extra} labels of {oracle!r} have no matching sample"
            )
        toxicity = pa.compute.fill_null(joined["toxicity"], float("nan"))
        ok = pa.compute.fill_null(joined["ok"], False)
        return samples.append_column("toxicity", toxicity).append_column("ok", ok)

    def done_prompt_ids(self, iteration: int) -> np.ndarray:
        """Prompt ids that already have samples in `iteration` (to skip when resuming)."""
        table = self.read_samples(iteration)
        return np.unique(table["prompt_id"].to_numpy()) if table.num_rows else np.zeros(0, np.int64)

    def unlabelled(self, iteration: int, oracle: str) -> pa.Table:
        """Samples of `iteration` without a committed label from `oracle` (to label next)."""
        samples = self.read_samples(iteration)
        labels = self.read_labels(iteration, oracle).select(_KEY)
        missing = _with_row(samples.select(_KEY)).join(labels, keys=_KEY, join_type="left anti")
        return samples.take(np.sort(missing["__row"].to_numpy()))

    # ------------------------------------------------------------------------ batches

    def arrays(
        self,
        iteration: int,
        *,
        oracle: str | None = None,
        prompt_len: int | None = None,
        completion_len: int | None = None,
        pad_multiple: int = 8,
    ) -> SampleArrays:
        """The iteration as flat numpy columns, ready to cut into fixed-shape batches."""
        table = self.read(iteration, oracle)
        if table.num_rows == 0:
            raise EmptySplitError(f"{self._samples_dir(iteration)}: no committed samples")
        return SampleArrays(table, prompt_len, completion_len, pad_multiple)

    def batches(
        self,
        iteration: int,
        batch_size: int,
        *,
        oracle: str | None = None,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = 1,
        drop_remainder: bool = False,
        prompt_len: int | None = None,
        completion_len: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> grain.IterDataset:
        """Fixed-shape numpy batches of this host's share of `iteration` (a grain dataset:
        `iter()` it; its iterator state is checkpointable like the corpus pipeline's).

        `batch_size` is per host; all hosts get the same number of batches. Without
        `drop_remainder` the last batch is filled with padding rows marked `valid_b=False`.
        """
        import grain

        from jaxdetox.data.corpora import host_info

        process_index, process_count = host_info(process_index, process_count)
        arrays = self.arrays(
            iteration, oracle=oracle, prompt_len=prompt_len, completion_len=completion_len
        )
        # Every host gets the same number of rows (-1 = a padding row) and so the same number
        # of batches: hosts that ran out early would leave the others waiting in a collective.
        per_host = -(-arrays.num_rows // process_count)
        mine = np.arange(arrays.num_rows)[process_index::process_count]
        mine = np.concatenate([mine, np.full(per_host - len(mine), -1)])
        rows = grain.MapDataset.source(mine)
        if shuffle:
            rows = rows.shuffle(seed=seed)
        rows = rows.repeat(num_epochs).batch(batch_size, drop_remainder=drop_remainder)
        batches = rows.map(functools.partial(_batch_of_rows, arrays, batch_size))
        # A short read-ahead: grain's default (hundreds of batches) only costs memory here.
        return batches.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


class SampleArrays:
    """An iteration's samples as flat columns; `batch(rows)` builds one padded batch.

    Row layout: prompt left-padded to `prompt_len`, completion right-padded to
    `completion_len`. `targets_bt[t]` is the token after t; `loss_mask_bt` is 1 where that
    target is a completion token (the positions the NADO BCE, the KL on samples and an SFT on
    samples use); `*_logprobs_bt[t]` is the stored log-prob of `targets_bt[t]`.
    """

    def __init__(
        self,
        table: pa.Table,
        prompt_len: int | None,
        completion_len: int | None,
        pad_multiple: int,
    ):
        self.num_rows = table.num_rows

        def flat(name: str) -> tuple[np.ndarray, np.ndarray]:
            col = table[name].combine_chunks()
            lengths = pa.compute.fill_null(pa.compute.list_value_length(col), 0).to_numpy()
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            values = pa.compute.list_flatten(col).to_numpy(zero_copy_only=False)
            return values, offsets

        self._prompt, self._prompt_off = flat("prompt_tokens")
        self._completion, self._completion_off = flat("completion_tokens")
        self.prompt_lengths = np.diff(self._prompt_off).astype(np.int32)
        self.completion_lengths = np.diff(self._completion_off).astype(np.int32)
        self._logprobs = {}
        for name in _LOGPROB_COLUMNS:
            values, offsets = flat(name)
            lengths = np.diff(offsets)
            bad = np.flatnonzero((lengths != 0) & (lengths != self.completion_lengths))
            if len(bad):
                raise DataError(f"{name} of sample row {bad[0]} does not match its completion")
            self._logprobs[name] = (values, offsets)
        longest_p = int(self.prompt_lengths.max())
        longest_c = int(self.completion_lengths.max())
        self.prompt_len = prompt_len or round_up(longest_p, pad_multiple)
        self.completion_len = completion_len or round_up(longest_c, pad_multiple)
        if longest_p > self.prompt_len or longest_c > self.completion_len:
            raise ValueError(
                f"stored prompts/completions reach {longest_p}/{longest_c} tokens, more than "
                f"prompt_len={self.prompt_len} / completion_len={self.completion_len}"
            )
        self.prompt_ids = table["prompt_id"].to_numpy()
        self.sample_index = table["sample_index"].to_numpy()
        has_labels = "ok" in table.column_names
        self.ok = table["ok"].to_numpy(zero_copy_only=False) if has_labels else None
        self.toxicity = (
            table["toxicity"].to_numpy(zero_copy_only=False).astype(np.float32)
            if has_labels
            else None
        )

    def batch(self, rows: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
        """The padded batch of sample `rows` (row index -1 = none), filled up to `batch_size`;
        missing rows are all padding (`valid_b=False`, segment id 0, prompt id -1)."""
        rows = np.asarray(rows, np.int64)
        if len(rows) > batch_size:
            raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
        rows = np.concatenate([rows, np.full(batch_size - len(rows), -1, np.int64)])
        valid_b = rows >= 0
        safe_b = np.where(valid_b, rows, 0)
        P, C = self.prompt_len, self.completion_len
        T = P + C
        tokens_bt = np.zeros((batch_size, T), np.int32)
        segment_ids_bt = np.zeros((batch_size, T), np.int32)
        completion_bt = np.zeros((batch_size, T), bool)
        logprobs = {name: np.zeros((batch_size, T), np.float32) for name in self._logprobs}
        for b in np.flatnonzero(valid_b):
            r = rows[b]
            p0, p1 = self._prompt_off[r], self._prompt_off[r + 1]
            c0, c1 = self._completion_off[r], self._completion_off[r + 1]
            lp, lc = p1 - p0, c1 - c0
            tokens_bt[b, P - lp : P] = self._prompt[p0:p1]
            tokens_bt[b, P : P + lc] = self._completion[c0:c1]
            segment_ids_bt[b, P - lp : P + lc] = 1
            completion_bt[b, P : P + lc] = True
            for name, (values, offsets) in self._logprobs.items():
                v0, v1 = offsets[r], offsets[r + 1]
                if v1 > v0:  # the log-prob of completion token j sits where j is predicted
                    logprobs[name][b, P - 1 : P - 1 + lc] = values[v0:v1]
        targets_bt, loss_mask_bt = next_token_targets(tokens_bt, segment_ids_bt, completion_bt)

        def take(column: np.ndarray, missing: Any, dtype: Any) -> np.ndarray:
            return np.where(valid_b, column[safe_b], missing).astype(dtype)

        out = {
            "tokens_bt": tokens_bt,
            "segment_ids_bt": segment_ids_bt,
            "positions_bt": positions_from_segments(segment_ids_bt),
            "targets_bt": targets_bt,
            "loss_mask_bt": loss_mask_bt,
            **{f"{name}_bt": value for name, value in logprobs.items()},
            # Sequence log-probs (importance weights, DESIGN.md §1): sums over the completion.
            **{f"{name[:-1]}_b": value.sum(axis=1) for name, value in logprobs.items()},
            "prompt_ids_b": take(self.prompt_ids, -1, np.int64),
            "sample_index_b": take(self.sample_index, -1, np.int32),
            "prompt_lengths_b": take(self.prompt_lengths, 0, np.int32),
            "completion_lengths_b": take(self.completion_lengths, 0, np.int32),
            "valid_b": valid_b,
        }
        if self.ok is not None:
            ok_b = take(self.ok, False, bool)
            out["ok_b"] = ok_b
            # Failed or missing scores are masked by ok_b; 0 keeps NaN out of the loss arithmetic.
            out["toxicity_b"] = np.where(ok_b, self.toxicity[safe_b], 0.0).astype(np.float32)
        return out


def _batch_of_rows(
    arrays: SampleArrays, batch_size: int, rows: np.ndarray
) -> dict[str, np.ndarray]:
    # Module-level (not a lambda) so the pipeline pickles into grain worker processes.
    return arrays.batch(np.asarray(rows), batch_size)
