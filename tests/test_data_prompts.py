"""Prompt sets: RTP (jsonl + tfds), ToxiGen (SafeNLP json), generic; filters, blocks, batches."""

import json
from pathlib import Path

import numpy as np
import pytest
from _tokenizer import make_tokenizer

from jaxdetox.data import (
    EmptySplitError,
    MalformedRecordError,
    MissingFieldError,
    load_prompt_records,
    load_prompts,
    load_rtp,
    load_rtp_tfds,
    load_toxigen,
    split_blocks,
    tokenize_prompts,
)

FIXTURES = Path(__file__).parent / "fixtures" / "data"
RTP = FIXTURES / "rtp_prompts.jsonl"


def _rtp_lines():
    return [json.loads(line) for line in RTP.read_text().splitlines()]


def test_rtp_jsonl_fields():
    prompts = load_rtp(RTP)
    lines = _rtp_lines()
    assert len(prompts) == len(lines) == 24
    assert list(prompts.texts) == [r["prompt"]["text"] for r in lines]
    np.testing.assert_allclose(prompts.toxicity, [r["prompt"]["toxicity"] for r in lines], 1e-6)
    assert list(prompts.challenging) == [r["challenging"] for r in lines]
    assert list(prompts.meta["continuation"]) == [r["continuation"]["text"] for r in lines]
    assert prompts.ids.dtype == np.int64 and (prompts.ids >= 0).all()
    assert len(set(prompts.ids.tolist())) == 24
    assert load_prompts(RTP).texts == prompts.texts  # format auto-detected


def test_rtp_null_scores_and_missing_fields(tmp_path):
    lines = _rtp_lines()[:3]
    lines[1]["prompt"]["toxicity"] = None  # the real file has null attribute scores
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines))
    prompts = load_rtp(path)
    assert np.isnan(prompts.toxicity[1]) and not np.isnan(prompts.toxicity[[0, 2]]).any()
    # Unscored prompts fail any toxicity bound rather than silently passing it.
    assert prompts.ids[1] not in prompts.filter(max_toxicity=1.0).ids
    assert len(prompts.filter(max_toxicity=1.0)) == 2

    del lines[2]["prompt"]["text"]
    path.write_text("\n".join(json.dumps(r) for r in lines))
    with pytest.raises(MissingFieldError) as e:
        load_rtp(path)
    assert "prompts.jsonl:3" in str(e.value) and "'prompt.text'" in str(e.value)
    assert "prompt.toxicity" in str(e.value) and "challenging" in str(e.value)

    path.write_text(RTP.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(MalformedRecordError, match=r"prompts\.jsonl:2"):
        load_rtp(path)


@pytest.mark.filterwarnings("ignore")
def test_rtp_from_tfds_builder_matches_jsonl(tmp_path):
    """The real tfds `real_toxicity_prompts` builder, prepared from the fixture file locally."""
    from etils import epath
    from tensorflow_datasets.datasets.real_toxicity_prompts import (
        real_toxicity_prompts_dataset_builder as rtp_builder,
    )

    class LocalRTP(rtp_builder.Builder, skip_registration=True):
        name = "real_toxicity_prompts"
        pkg_dir_path = epath.Path(rtp_builder.__file__).parent  # its README/citation metadata

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(RTP)}  # instead of the network download

    LocalRTP(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    from_tfds = load_rtp_tfds(tmp_path)
    from_jsonl = load_rtp(RTP)
    assert "tfds 'real_toxicity_prompts'" in from_tfds.source
    # tfds stores examples in its own order; the stable ids make blocks source-independent.
    a, b = (
        split_blocks(from_tfds, block_size=5, eval_size=4),
        split_blocks(from_jsonl, block_size=5, eval_size=4),
    )
    for block_a, block_b in [
        (a.eval_block(), b.eval_block()),
        (a.train_block(2), b.train_block(2)),
    ]:
        assert block_a.texts == block_b.texts
        np.testing.assert_array_equal(block_a.ids, block_b.ids)
        np.testing.assert_allclose(block_a.toxicity, block_b.toxicity)
        np.testing.assert_array_equal(block_a.challenging, block_b.challenging)


def test_toxigen_safenlp_format():
    raw = json.loads((FIXTURES / "toxigen.json").read_text())
    prompts = load_toxigen(FIXTURES / "toxigen.json")
    assert list(prompts.texts) == [r["text"] for r in raw]
    np.testing.assert_allclose(prompts.toxicity, [(r["toxicity_score"] - 1) / 4 for r in raw], 1e-6)
    assert list(prompts.challenging) == [r["label"] == "hate" for r in raw]
    assert prompts.meta["target_groups"][6] == ("immigrants", "northerners")
    hate = load_toxigen(FIXTURES / "toxigen.json", labels=["hate"])
    assert len(hate) == 4 and set(hate.meta["label"]) == {"hate"}
    assert load_prompts(FIXTURES / "toxigen.json").texts == prompts.texts


def test_generic_txt_and_jsonl_prompts():
    txt = load_prompts(FIXTURES / "prompts.txt")
    assert txt.texts[0] == "The weather today is" and len(txt) == 3
    assert np.isnan(txt.toxicity).all()
    rec = load_prompt_records(FIXTURES / "corpus.jsonl", id_field="id")
    assert len(rec) == 40 and rec.keys[5] == "id:5"
    with pytest.raises(
        MissingFieldError, match=r"missing_field\.jsonl:2.*'text'.*\['body', 'id'\]"
    ):
        load_prompt_records(FIXTURES / "missing_field.jsonl")


def test_builtin_demo_prompts_load_with_meta_filters():
    import jaxdetox.assets
    from jaxdetox.assets import load_prompts as asset_rows
    from jaxdetox.data.readers import JsonlSource

    path = Path(jaxdetox.assets.__file__).parent / "prompts.jsonl"
    prompts = load_prompt_records(JsonlSource(path), id_field="id", meta_fields=("split", "kind"))
    train_toxic = prompts.filter(meta={"split": "train", "kind": "toxic"})
    expected = asset_rows(split="train", kind="toxic")
    assert list(train_toxic.texts) == [r["text"] for r in expected]
    assert train_toxic.keys == tuple(f"id:{r['id']}" for r in expected)
    with pytest.raises(KeyError, match="no meta column 'lang'"):
        prompts.filter(meta={"lang": "en"})


def test_filters():
    prompts = load_rtp(RTP)
    tox = prompts.filter(min_toxicity=0.5)
    assert len(tox) > 0 and (tox.toxicity >= 0.5).all()
    assert len(tox) == int((prompts.toxicity >= 0.5).sum())
    low = prompts.filter(max_toxicity=0.1)
    assert (low.toxicity <= 0.1).all() and len(low) + len(tox) <= len(prompts)
    chal = prompts.filter(challenging=True)
    assert chal.challenging.all() and len(chal) == int(prompts.challenging.sum()) > 0
    both = prompts.filter(min_toxicity=0.5, challenging=False)
    assert ((both.toxicity >= 0.5) & ~both.challenging).all()
    with pytest.raises(EmptySplitError, match=r"no prompt of 24 passes the filter.*min_toxicity=2"):
        prompts.filter(min_toxicity=2.0)


def test_blocks_are_deterministic_disjoint_and_cover():
    prompts = load_rtp(RTP)
    blocks = split_blocks(prompts, seed=3, block_size=6, eval_size=4)
    again = split_blocks(prompts, seed=3, block_size=6, eval_size=4)
    other = split_blocks(prompts, seed=4, block_size=6, eval_size=4)
    assert blocks.num_train_blocks == 3
    ids = [blocks.eval_block().ids] + [blocks.train_block(i).ids for i in range(3)]
    assert [len(x) for x in ids] == [4, 6, 6, 6]
    flat = np.concatenate(ids)
    assert len(np.unique(flat)) == len(flat) == 22  # disjoint; 2 prompts left over
    np.testing.assert_array_equal(blocks.train_block(1).ids, again.train_block(1).ids)
    assert not np.array_equal(blocks.ordered.ids, other.ordered.ids)
    # Reordering the input file does not change the blocks.
    shuffled_input = prompts.take(np.random.default_rng(0).permutation(len(prompts)))
    np.testing.assert_array_equal(
        split_blocks(shuffled_input, seed=3, block_size=6, eval_size=4).train_block(2).ids,
        blocks.train_block(2).ids,
    )
    with pytest.raises(EmptySplitError, match="iteration 3 needs training block 3"):
        blocks.train_block(3)


@pytest.mark.parametrize("bos", [False, True])
def test_truncation_and_overflow(bos):
    tok = make_tokenizer(bos_prefix=bos)
    prompts = load_rtp(RTP)
    full = tok(list(prompts.texts), add_special_tokens=False)["input_ids"]
    n = sorted(len(f) for f in full)[len(full) // 2]  # about half the prompts are longer
    long = [i for i, f in enumerate(full) if len(f) > n]
    assert 3 < len(long) < len(full) - 3
    prefix = [tok.bos_token_id] if bos else []

    left = tokenize_prompts(prompts, tok, max_tokens=n, overflow="truncate_left")
    right = tokenize_prompts(prompts, tok, max_tokens=n, overflow="truncate_right")
    drop = tokenize_prompts(prompts, tok, max_tokens=n, overflow="drop")
    assert left.num_truncated == right.num_truncated == len(long) == drop.num_dropped
    for i, f in enumerate(full):
        assert list(left.tokens[i]) == prefix + f[-n:]
        assert list(right.tokens[i]) == prefix + f[:n]
        assert left.texts[i] == (tok.decode(f[-n:]) if i in long else prompts.texts[i])
    assert list(drop.ids) == [pid for i, pid in enumerate(prompts.ids) if i not in long]
    with pytest.raises(EmptySplitError, match="all 24 prompts were dropped"):
        tokenize_prompts(prompts, tok, max_tokens=1, overflow="drop")
