"""Persistent store of the pipeline's samples and labels, per iteration, in parquet.

Layout (`SCHEMA_VERSION` in `store.json` and in every file's metadata):

    root/store.json
    root/iter_0003/samples/<chunk>.parquet            one committed chunk of samples
    root/iter_0003/labels/<oracle>/<chunk>.parquet     oracle scores, joined by sample key
    root/iter_0003/<stage>.done.json                   stage markers (`mark_done`)

Append-only and crash-safe: a chunk is written to a dot-prefixed temporary name in the same
directory, flushed, fsynced and renamed into place, so readers (which ignore dot-files) see a
chunk entirely or not at all; on an object store (`gs://...`) the chunk is uploaded as one
object, which appears only once complete. A sample's key is (prompt_id, sample_index);
resuming a stage means skipping the prompts `done_prompt_ids` lists (sampling) or the keys
`unlabelled` does not list (labelling). A failed label (`ok=False`) stays in its chunk; a
retry commits a new chunk whose good label supersedes it when reading. `arrays()` /
`batches()` read an iteration back as fixed-shape numpy batches for the NADO and LM steps
(built in `store_batches.py`).

Multi-host: each host commits its own rows under chunk names that include its process index,
every host reads all committed chunks (a shared directory) and `batches()` gives each host a
disjoint share with the same number of batches; `corpora.to_global` makes global arrays of
the model columns (`corpora.split_host_keys` keeps the int64 prompt ids on the host).
"""

from __future__ import annotations

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

from jaxdetox import fileio
from jaxdetox.data.errors import DataError, EmptySplitError, SchemaError
from jaxdetox.data.store_batches import SampleArrays, host_batches

if TYPE_CHECKING:
    import grain

SCHEMA_VERSION = 1
FORMAT_NAME = "jaxdetox.sample_store"
_META_KEY = b"jaxdetox"
_KEY = ["prompt_id", "sample_index"]
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
    if not fileio.is_local(path):  # object stores: one upload, visible only when complete
        with path.open("wb") as f:
            pq.write_table(table, f)
        return
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with tmp.open("wb") as f:
            pq.write_table(table, f)
            f.flush()
            try:
                os.fsync(f.fileno())  # local files; object stores commit on close
            except (AttributeError, OSError, ValueError):
                pass
        commit_chunk(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def commit_chunk(tmp: epath.Path, path: epath.Path) -> None:
    """Move `tmp` to `path` atomically, refusing to replace a chunk another writer committed."""
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
    fileio.atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))
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

    def iteration_dir(self, iteration: int) -> epath.Path:
        """The directory holding `iteration`'s samples, labels and done markers."""
        return self._iter_dir(iteration)

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

    def done_info(self, iteration: int, stage: str) -> dict[str, Any] | None:
        """The info `mark_done(iteration, stage, info)` committed, or None if not done."""
        path = self._iter_dir(iteration) / f"{_check_name('stage', stage)}.done.json"
        return json.loads(path.read_text()) if path.exists() else None

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
        """One label per labelled sample of `iteration` from `oracle`, sorted by sample key:
        its good label if one was committed, else a failed attempt (`ok=False`, NaN)."""
        return self.label_attempts(iteration, oracle).select(LABELS_SCHEMA.names)

    def label_attempts(self, iteration: int, oracle: str) -> pa.Table:
        """`read_labels` plus `attempts` (int32): how many labels of each sample were committed.

        A failed label is an attempt, not an answer: a good label of the same sample (a
        retry) supersedes it. Two good labels of one sample are an error (good ones are never
        rescored), as are two labels of one sample in one chunk.
        """
        directory = self._labels_dir(iteration, oracle)
        tables = []
        for i, path in enumerate(self._committed(directory)):
            chunk = _read_table(path, LABELS_SCHEMA)
            tables.append(chunk.append_column("__chunk", pa.array(np.full(len(chunk), i))))
        if not tables:
            return LABELS_SCHEMA.empty_table().append_column("attempts", pa.array([], pa.int32()))
        table = pa.concat_tables(tables)
        if table.group_by([*_KEY, "__chunk"]).aggregate([]).num_rows != table.num_rows:
            raise DataError(f"{directory}: the same (prompt_id, sample_index) twice in a chunk")
        # Per key: its good label (if any) first, then the failed attempts.
        table = table.sort_by([(k, "ascending") for k in _KEY] + [("ok", "descending")])
        n = table.num_rows
        pid = table["prompt_id"].to_numpy()
        sid = table["sample_index"].to_numpy()
        first = np.ones(n, bool)
        first[1:] = (pid[1:] != pid[:-1]) | (sid[1:] != sid[:-1])
        starts = np.flatnonzero(first)
        attempts = np.diff(np.append(starts, n)).astype(np.int32)
        ok = table["ok"].to_numpy(zero_copy_only=False).astype(np.int64)
        good = np.add.reduceat(ok, starts)
        if np.any(good > 1):
            b = starts[np.argmax(good > 1)]
            raise DataError(
                f"{directory}: sample (prompt_id={pid[b]}, sample_index={sid[b]}) has "
                f"{good.max()} good labels; a good label is never rescored"
            )
        resolved = table.take(starts).select(LABELS_SCHEMA.names)
        return resolved.append_column("attempts", pa.array(attempts, pa.int32()))

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

    def unlabelled(
        self, iteration: int, oracle: str, *, max_attempts: int | None = None
    ) -> pa.Table:
        """Samples of `iteration` with no good label from `oracle` (to label next): never
        scored, or every attempt failed. With `max_attempts`, samples that already failed that
        many times are left out."""
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be ≥ 1 or None, got {max_attempts}")
        samples = self.read_samples(iteration)
        labels = self.label_attempts(iteration, oracle)
        ok = labels["ok"].to_numpy(zero_copy_only=False)
        done = ok
        if max_attempts is not None:
            done = ok | (labels["attempts"].to_numpy() >= max_attempts)
        settled = labels.select(_KEY).filter(pa.array(done))
        missing = _with_row(samples.select(_KEY)).join(settled, keys=_KEY, join_type="left anti")
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
        rows: np.ndarray | None = None,
    ) -> grain.IterDataset:
        """Fixed-shape numpy batches of this host's share of `iteration` (a grain dataset:
        `iter()` it; its iterator state is checkpointable like the corpus pipeline's).

        `batch_size` is per host; all hosts get the same number of batches. Every epoch is
        batched on its own (`store_batches.batches_per_epoch` batches each): without
        `drop_remainder` an epoch's last batch is filled with padding rows marked
        `valid_b=False`, with it that batch is dropped. `rows`: only these row indices of
        the iteration (e.g. a training split).
        """
        arrays = self.arrays(
            iteration, oracle=oracle, prompt_len=prompt_len, completion_len=completion_len
        )
        return host_batches(
            arrays,
            batch_size,
            seed=seed,
            shuffle=shuffle,
            num_epochs=num_epochs,
            drop_remainder=drop_remainder,
            process_index=process_index,
            process_count=process_count,
            rows=rows,
        )
