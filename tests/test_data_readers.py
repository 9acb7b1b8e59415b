"""Record readers: jsonl/txt/json/parquet/HF-on-disk/tfds, and the errors for bad input."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxdetox.data import EmptySplitError, MalformedRecordError, MissingFieldError
from jaxdetox.data.readers import (
    HFDatasetSource,
    JsonListSource,
    JsonlSource,
    ParquetSource,
    TextLinesSource,
    TfdsSource,
    get_field,
    open_source,
)

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def test_jsonl_index_skips_blank_lines_and_names_file_line(tmp_path):
    src = JsonlSource(FIXTURES / "malformed.jsonl")
    assert len(src) == 4  # 5 lines, one blank
    assert src[0] == {"text": "fine line one"}
    assert src[3] == {"text": "after"}
    with pytest.raises(MalformedRecordError, match=r"malformed\.jsonl:4: malformed JSON line"):
        src[2]
    assert src.describe(3).endswith("malformed.jsonl:5")


def test_jsonl_without_trailing_newline_crlf_and_non_objects(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\r\n   \r\n{"a": 2}\r\n[1, 2]\n{"a": 3}')
    src = JsonlSource(path)
    assert [src[i]["a"] for i in (0, 1, 3)] == [1, 2, 3]
    with pytest.raises(MalformedRecordError, match=r"x\.jsonl:4: expected a JSON object"):
        src[2]


def test_jsonl_index_across_read_blocks(tmp_path, monkeypatch):
    import jaxdetox.data.readers as readers

    monkeypatch.setattr(readers, "_INDEX_BLOCK_BYTES", 7)  # lines straddle many blocks
    lines = [{"i": i, "pad": "x" * (i % 5)} for i in range(30)]
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    src = JsonlSource(path)
    assert [src[i] for i in range(len(src))] == lines
    assert src.describe(29) == f"{path}:30"


def test_missing_field_names_field_and_fields_seen():
    src = JsonlSource(FIXTURES / "missing_field.jsonl")
    with pytest.raises(MissingFieldError) as e:
        get_field(src[1], "text", src.describe(1))
    msg = str(e.value)
    assert "missing_field.jsonl:2" in msg and "'text'" in msg
    assert "body" in msg and "id" in msg
    # Nested records list dotted names.
    with pytest.raises(MissingFieldError, match=r"prompt\.text.*fields seen: \['prompt\.txt'\]"):
        get_field({"prompt": {"txt": "x"}}, "prompt.text", "here")


def test_empty_sources_say_so(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(EmptySplitError, match=r"empty\.jsonl: no records"):
        JsonlSource(tmp_path / "empty.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(EmptySplitError, match="empty"):
        JsonListSource(tmp_path / "empty.json")
    with pytest.raises(EmptySplitError, match=r"no \*\.parquet"):
        ParquetSource(tmp_path)


def test_txt_and_json_sources():
    txt = TextLinesSource(FIXTURES / "prompts.txt")
    assert [txt[i]["text"] for i in range(len(txt))] == [
        "The weather today is",
        "My favourite book is about",
        "The train was late because",
    ]
    tg = JsonListSource(FIXTURES / "toxigen.json")
    assert len(tg) == 10 and tg[1]["label"] == "hate"
    assert tg.describe(3).endswith("toxigen.json[3]")


def test_malformed_json_list_names_line(tmp_path):
    (tmp_path / "bad.json").write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(MalformedRecordError, match=r"bad\.json:3"):
        JsonListSource(tmp_path / "bad.json")


def test_parquet_and_hf_on_disk_sources(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"doc {i}", "nested": {"score": i / 10}} for i in range(7)]
    pq.write_table(pa.Table.from_pylist(rows[:4]), tmp_path / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), tmp_path / "part-1.parquet")
    par = open_source(tmp_path)
    assert isinstance(par, ParquetSource) and [par[i] for i in range(7)] == rows
    assert get_field(par[3], "nested.score", par.describe(3)) == pytest.approx(0.3)

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
    )
    dd.save_to_disk(str(tmp_path / "hf"))
    hf = open_source(tmp_path / "hf", split="test")
    assert isinstance(hf, HFDatasetSource) and len(hf) == 2 and hf[1]["text"] == "doc 1"
    with pytest.raises(EmptySplitError, match=r"'validation' not found.*\['test', 'train'\]"):
        open_source(tmp_path / "hf", split="validation")
    empty = datasets.Dataset.from_dict({"text": []})
    with pytest.raises(EmptySplitError, match="no rows"):
        HFDatasetSource(empty, "empty-ds")


def _build_tiny_tfds(data_dir, texts):
    """A locally built tfds dataset (GeneratorBasedBuilder → array_record, no TensorFlow)."""
    import tensorflow_datasets as tfds

    class TinyCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"text": tfds.features.Text(), "score": np.float32}
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(texts), "test": self._generate_examples(["t"])}

        def _generate_examples(self, items):
            for i, t in enumerate(items):
                yield i, {"text": t, "score": i / 10}

    builder = TinyCorpus(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


@pytest.mark.filterwarnings("ignore")
def test_tfds_array_record_source(tmp_path):
    texts = [f"tfds document number {i}" for i in range(9)]
    builder = _build_tiny_tfds(tmp_path, texts)
    src = open_source(builder.data_dir, split="train")  # a prepared-version directory
    assert isinstance(src, TfdsSource) and len(src) == 9
    got = sorted(get_field(src[i], "text", src.describe(i)).decode() for i in range(9))
    assert got == sorted(texts)
    assert len(open_source(f"tfds:{builder.name}", split="test", data_dir=tmp_path)) == 1
    with pytest.raises(EmptySplitError, match=r"available splits: \['test', 'train'\]"):
        open_source(builder.data_dir, split="validation")
    with pytest.raises(FileNotFoundError, match="cannot open prepared data"):
        TfdsSource("real_toxicity_prompts", split="train", data_dir=tmp_path / "nothing")


def test_open_source_rejects_unknown_formats(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unknown data format '\.csv'"):
        open_source(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError):
        open_source(tmp_path / "missing.jsonl")
