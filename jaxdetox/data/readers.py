"""Random-access record sources: jsonl, txt, json lists, parquet, HF `datasets` on disk, tfds.

Every source has `len()`, `source[i] -> dict` and `describe(i)` (e.g. `prompts.jsonl:12`), so
grain can shuffle and shard it by index, and every error can say which record is at fault.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from jaxdetox.data.errors import DataError, EmptySplitError, MalformedRecordError, missing_field

_INDEX_BLOCK_BYTES = 64 << 20


@runtime_checkable
class RecordSource(Protocol):
    """What every reader offers: random access by index and a description of each record."""

    name: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...

    def describe(self, index: int) -> str:
        """Where record `index` comes from, for error messages (e.g. `prompts.jsonl:12`)."""
        ...


def flat_field_names(record: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of all leaves of a nested record (`prompt.text`, `challenging`, ...)."""
    names = []
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            names.extend(flat_field_names(value, prefix=name + "."))
        else:
            names.append(name)
    return names


def get_field(record: Mapping[str, Any], field: str, where: str) -> Any:
    """Value of `field` in `record`: a literal key first, then a dotted path into nested dicts."""
    if field in record:
        return record[field]
    node: Any = record
    for part in field.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise missing_field(where, field, flat_field_names(record))
        node = node[part]
    return node


def as_text(value: Any, where: str, field: str) -> str:
    """A text field as `str` (tfds stores text as bytes); null or non-text values are errors."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "SO":
        return as_text(value.item(), where, field)
    if isinstance(value, str):
        return value
    raise MalformedRecordError(
        f"{where}: field '{field}' should be text, got {type(value).__name__} ({value!r:.60})"
    )


def as_float(value: Any, where: str, field: str) -> float:
    """A numeric field as float; JSON null becomes NaN (RealToxicityPrompts has null scores)."""
    if value is None:
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MalformedRecordError(
            f"{where}: field '{field}' should be a number or null, got {value!r:.60}"
        ) from None


def _line_index(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start offsets, byte lengths, 1-based line numbers) of the non-blank lines of a file."""
    starts, lengths, numbers = [], [], []
    line_base, offset, carry_start = 0, 0, 0
    with open(path, "rb") as f:
        while block := f.read(_INDEX_BLOCK_BYTES):
            newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n")) + offset
            line_starts = np.concatenate([[carry_start], newlines[:-1] + 1]).astype(np.int64)
            if len(newlines):
                starts.append(line_starts)
                lengths.append(newlines - line_starts)
                numbers.append(line_base + 1 + np.arange(len(newlines)))
                line_base += len(newlines)
                carry_start = int(newlines[-1]) + 1
            offset += len(block)
    if offset > carry_start:  # last line without a trailing newline
        starts.append(np.array([carry_start]))
        lengths.append(np.array([offset - carry_start]))
        numbers.append(np.array([line_base + 1]))
    if not starts:
        return (np.zeros(0, np.int64),) * 3
    s, n, ln = (np.concatenate(a).astype(np.int64) for a in (starts, lengths, numbers))
    # Blank lines (and whitespace-only short lines, checked exactly) are not records.
    keep = n > 0
    short = np.flatnonzero((n > 0) & (n <= 8))
    if len(short):
        with open(path, "rb") as f:
            for i in short:
                f.seek(s[i])
                keep[i] = bool(f.read(n[i]).strip())
    return s[keep], n[keep], ln[keep]


class _LineFile:
    """Shared machinery of line-oriented files: an offset index and thread-safe `os.pread`."""

    def __init__(self, path: str | os.PathLike, kind: str):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{kind} file not found: {self.path}")
        self.name = str(self.path)
        self._starts, self._lengths, self._lines = _line_index(self.path)
        if len(self._starts) == 0:
            raise EmptySplitError(f"{self.path}: no records (the file is empty or all blank)")
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._starts)

    def __getstate__(self) -> dict[str, Any]:
        # File descriptors do not survive pickling (grain worker processes): reopen lazily.
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def describe(self, index: int) -> str:
        """`file:line` of record `index`."""
        return f"{self.path}:{int(self._lines[index])}"

    def _raw(self, index: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self._fd, int(self._lengths[index]), int(self._starts[index]))


class JsonlSource(_LineFile):
    """One JSON object per line; a malformed line raises an error naming `file:line`."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, "jsonl")

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self._raw(index)
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise MalformedRecordError(
                f"{self.describe(index)}: malformed JSON line ({e.msg} at column {e.colno}): "
                f"{raw[:80]!r}"
            ) from None
        except UnicodeDecodeError as e:  # json.loads decodes bytes first
            raise MalformedRecordError(f"{self.describe(index)}: not UTF-8 text ({e})") from None
        if not isinstance(record, dict):
            raise MalformedRecordError(
                f"{self.describe(index)}: expected a JSON object, got {type(record).__name__}"
            )
        return record


class TextLinesSource(_LineFile):
    """Plain text, one record per non-blank line: `{"text": line}`."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, "text")

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self._raw(index)
        try:
            return {"text": raw.decode("utf-8").rstrip("\r")}
        except UnicodeDecodeError as e:
            raise MalformedRecordError(f"{self.describe(index)}: not UTF-8 text ({e})") from None


class JsonListSource:
    """A JSON file holding a list of objects (SafeNLP `toxiGen.json`), or such a list under `key`."""

    def __init__(self, path: str | os.PathLike, key: str | None = None):
        self.path = Path(path)
        self.name = str(self.path)
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise MalformedRecordError(
                f"{self.path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})"
            ) from None
        except UnicodeDecodeError as e:
            raise MalformedRecordError(f"{self.path}: not UTF-8 text ({e})") from None
        if key is not None:
            data = get_field(data, key, str(self.path)) if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise MalformedRecordError(
                f"{self.path}: expected a JSON list of objects, got {type(data).__name__}"
            )
        for i, record in enumerate(data):
            if not isinstance(record, dict):
                raise MalformedRecordError(
                    f"{self.path}[{i}]: expected a JSON object, got {type(record).__name__}"
                )
        if not data:
            raise EmptySplitError(f"{self.path}: the JSON list is empty")
        self._records = data

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._records[index]

    def describe(self, index: int) -> str:
        """`file[entry]` of record `index`."""
        return f"{self.path}[{index}]"


class ParquetSource:
    """A parquet file or a directory of parquet files, memory-mapped through pyarrow."""

    def __init__(self, path: str | os.PathLike):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.name = str(self.path)
        files = sorted(self.path.glob("*.parquet")) if self.path.is_dir() else [self.path]
        if not files:
            raise EmptySplitError(f"{self.path}: no *.parquet files in this directory")
        import pyarrow as pa

        self._table = pa.concat_tables([pq.read_table(f, memory_map=True) for f in files])
        if self._table.num_rows == 0:
            raise EmptySplitError(f"{self.path}: the parquet data has no rows")

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._table.slice(index, 1).to_pylist()[0]

    def describe(self, index: int) -> str:
        """`path row i`."""
        return f"{self.path} row {index}"


class HFDatasetSource:
    """A Hugging Face `datasets.Dataset` (e.g. from `save_to_disk`); picks `split` of a DatasetDict."""

    def __init__(self, dataset: Any, name: str, split: str | None = None):
        import datasets

        if isinstance(dataset, datasets.DatasetDict):
            if split is None or split not in dataset:
                raise EmptySplitError(
                    f"{name}: split {split!r} not found; available splits: {sorted(dataset)}"
                )
            dataset = dataset[split]
        self.name = name if split is None else f"{name} split '{split}'"
        if len(dataset) == 0:
            raise EmptySplitError(f"{self.name}: the dataset has no rows")
        self._ds = dataset

    @classmethod
    def from_disk(cls, path: str | os.PathLike, split: str | None = None) -> HFDatasetSource:
        """Open a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
        import datasets

        return cls(datasets.load_from_disk(str(path)), str(path), split)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._ds[int(index)]

    def describe(self, index: int) -> str:
        """`dataset row i`."""
        return f"{self.name} row {index}"


class TfdsSource:
    """A prepared tfds dataset read through array_record data sources (no TensorFlow needed).

    `name` is a registered builder name (`real_toxicity_prompts`, `civil_comments`, ...) whose
    prepared data lies under `data_dir`, or a directory holding one prepared version.
    """

    def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None = None):
        import tensorflow_datasets as tfds

        self.name = f"tfds '{name}' split '{split}'"
        try:
            if Path(name).is_dir():
                builder = tfds.builder_from_directory(name)
            else:
                builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
                if not builder.is_prepared():
                    raise FileNotFoundError(f"nothing prepared at {builder.data_path}")
            if split not in builder.info.splits:
                raise EmptySplitError(
                    f"{self.name}: no such split; available splits: {sorted(builder.info.splits)}"
                )
            self._ds = builder.as_data_source(split=split)
        except EmptySplitError:
            raise
        except Exception as e:  # tfds raises assorted errors for data that is not prepared
            raise FileNotFoundError(
                f"{self.name}: cannot open prepared data under data_dir={data_dir!s} ({e}). "
                "Prepare it once with `tfds build` / `builder.download_and_prepare(file_format="
                "'array_record')` on a machine with network access, or point data_dir at it."
            ) from e
        self.features = builder.info.features
        if len(self._ds) == 0:
            raise EmptySplitError(f"{self.name}: the split has no examples")

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._ds[int(index)]

    def describe(self, index: int) -> str:
        """`tfds 'name' split 's' example i`."""
        return f"{self.name} example {index}"


def open_source(
    spec: str | os.PathLike, *, split: str = "train", data_dir: str | os.PathLike | None = None
) -> RecordSource:
    """Open records from `tfds:NAME`, `hf:DIR`, or a path (.jsonl, .json, .txt, .parquet, dirs).

    Directories: a tfds prepared-version directory (has `features.json`), a `save_to_disk`
    directory (has `state.json` or `dataset_dict.json`), or a directory of parquet files.
    """
    spec = str(spec)
    if spec.startswith("tfds:"):
        return TfdsSource(spec[len("tfds:") :], split=split, data_dir=data_dir)
    if spec.startswith("hf:"):
        return HFDatasetSource.from_disk(spec[len("hf:") :], split=split)
    path = Path(spec)
    if path.is_dir():
        if (path / "features.json").exists():
            return TfdsSource(str(path), split=split)
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return HFDatasetSource.from_disk(path, split=split)
        return ParquetSource(path)
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {spec}")
    suffix = path.suffix.lower()
    readers = {".jsonl": JsonlSource, ".ndjson": JsonlSource, ".txt": TextLinesSource}
    if suffix in readers:
        return readers[suffix](path)
    if suffix == ".json":
        return JsonListSource(path)
    if suffix == ".parquet":
        return ParquetSource(path)
    raise DataError(
        f"{spec}: unknown data format '{suffix}'; expected .jsonl, .json, .txt, .parquet, a "
        "directory (tfds prepared data, HF save_to_disk, parquet files), tfds:NAME or hf:DIR"
    )


def check_fields(source: RecordSource, fields: Sequence[str], index: int = 0) -> None:
    """Fail early (naming the field and the fields seen) if record `index` lacks any of `fields`."""
    record = source[index]
    for field in fields:
        get_field(record, field, source.describe(index))
