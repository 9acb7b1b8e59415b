"""Sample store: round trip, labels, batches for the NADO/LM steps, resume, crash safety."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jaxdetox.data import DataError, EmptySplitError, SampleStore, SchemaError
from jaxdetox.data.sample_store import SCHEMA_VERSION

K = 3  # samples per prompt
C = 6  # max new tokens


def _fake_sampler_output(prompt_ids, seed):
    """What a sampler returns for k samples of each prompt: padded [N, C] arrays + lengths."""
    rng = np.random.default_rng(seed)
    n = len(prompt_ids) * K
    lengths = rng.integers(1, C + 1, n).astype(np.int32)
    lengths[0] = C
    steps = np.arange(C)[None, :] < lengths[:, None]
    tokens = np.where(steps, rng.integers(3, 90, (n, C)), 0).astype(np.int32)
    logprobs = np.where(steps, -rng.random((n, C)), 0).astype(np.float32)
    model_logprobs = np.where(steps, -rng.random((n, C)), 0).astype(np.float32)
    return {
        "prompt_ids": np.repeat(prompt_ids, K),
        "sample_index": np.tile(np.arange(K), len(prompt_ids)),
        "prompt_tokens": [
            rng.integers(3, 90, rng.integers(1, 9)).astype(np.int32)
            for _ in np.repeat(prompt_ids, K)
        ],
        "completion_tokens": tokens,
        "completion_lengths": lengths,
        "prompt_texts": [f"prompt {p}" for p in np.repeat(prompt_ids, K)],
        "completion_texts": [f"completion {i}" for i in range(n)],
        "sampling_logprobs": logprobs,
        "model_logprobs": model_logprobs,
    }


def _write_iteration(store, iteration, chunks):
    written = {}
    for name, prompt_ids in chunks.items():
        data = _fake_sampler_output(np.asarray(prompt_ids), seed=hash(name) % 1000)
        store.write_samples(iteration, name, **data, metadata={"model_step": 7})
        written[name] = data
    return written


def _rows_by_key(written):
    rows = {}
    for data in written.values():
        for i in range(len(data["prompt_ids"])):
            n = data["completion_lengths"][i]
            rows[(int(data["prompt_ids"][i]), int(data["sample_index"][i]))] = {
                "prompt_tokens": data["prompt_tokens"][i].tolist(),
                "completion_tokens": data["completion_tokens"][i, :n].tolist(),
                "sampling_logprobs": data["sampling_logprobs"][i, :n],
                "model_logprobs": data["model_logprobs"][i, :n],
                "prompt_text": data["prompt_texts"][i],
                "completion_text": data["completion_texts"][i],
            }
    return rows


def test_round_trip(tmp_path):
    store = SampleStore(tmp_path / "store")
    written = _write_iteration(store, 2, {"b000": [11, 5], "b001": [42, 7]})
    assert store.iterations() == [2] and store.chunks(2) == ["b000", "b001"]
    table = store.read_samples(2)
    assert table.num_rows == 4 * K
    keys = list(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist()))
    assert keys == sorted(keys)  # independent of chunking
    expected = _rows_by_key(written)
    for i, key in enumerate(keys):
        row, want = table.slice(i, 1).to_pylist()[0], expected[key]
        for name in ("prompt_tokens", "completion_tokens", "prompt_text", "completion_text"):
            assert row[name] == want[name], name
        np.testing.assert_array_equal(
            np.float32(row["sampling_logprobs"]), want["sampling_logprobs"]
        )
        np.testing.assert_array_equal(np.float32(row["model_logprobs"]), want["model_logprobs"])
        assert row["base_logprobs"] is None
    meta = json.loads(
        pq.read_schema(store.root / "iter_0002/samples/b000.parquet").metadata[b"jaxdetox"]
    )
    assert meta["schema_version"] == SCHEMA_VERSION and meta["model_step"] == 7
    assert sorted(store.done_prompt_ids(2).tolist()) == [5, 7, 11, 42]
    # A second handle on the same directory sees the same data.
    assert SampleStore(tmp_path / "store").read_samples(2).equals(table)


def test_labels_join_and_resume_labelling(tmp_path):
    store = SampleStore(tmp_path)
    _write_iteration(store, 0, {"a": [1, 2, 3]})
    assert store.unlabelled(0, "default").num_rows == 3 * K
    store.write_labels(
        0,
        "part0",
        oracle="default",
        prompt_ids=[1, 1, 2],
        sample_index=[0, 2, 1],
        toxicity=[0.9, 0.1, 0.5],
        ok=[True, True, False],
    )
    left = store.unlabelled(0, "default")
    assert left.num_rows == 3 * K - 2  # the failed label (2, 1) is to be retried
    assert (2, 1) in set(zip(left["prompt_id"].to_pylist(), left["sample_index"].to_pylist()))
    assert (1, 0) not in set(zip(left["prompt_id"].to_pylist(), left["sample_index"].to_pylist()))
    joined = store.read(0, oracle="default")
    by_key = {
        (p, s): (t, o)
        for p, s, t, o in zip(
            *(joined[c].to_pylist() for c in ("prompt_id", "sample_index", "toxicity", "ok"))
        )
    }
    assert by_key[(1, 0)] == (pytest.approx(0.9), True)
    assert by_key[(2, 1)][1] is False  # an oracle failure stays masked
    assert np.isnan(by_key[(3, 0)][0]) and by_key[(3, 0)][1] is False  # not labelled yet
    assert store.read_labels(0, "other").num_rows == 0  # labels are per oracle
    store.write_labels(
        0, "bad", oracle="default", prompt_ids=[99], sample_index=[0], toxicity=[0.0], ok=[True]
    )
    with pytest.raises(DataError, match="1 labels of 'default' have no matching sample"):
        store.read(0, oracle="default")


def test_a_good_label_supersedes_failed_attempts(tmp_path):
    store = SampleStore(tmp_path)
    _write_iteration(store, 0, {"a": [1, 2]})

    def label(chunk, pids, sids, ok, oracle="default"):
        tox = [0.25 if o else float("nan") for o in ok]
        store.write_labels(
            0, chunk, oracle=oracle, prompt_ids=pids, sample_index=sids, toxicity=tox, ok=ok
        )

    label("first", [1, 1, 2], [0, 1, 0], [False, True, False])
    label("retry1", [1, 2], [0, 0], [False, False])
    label("retry2", [1], [0], [True])
    attempts = store.label_attempts(0, "default")
    assert attempts.to_pydict()["attempts"] == [3, 1, 2]
    table = store.read(0, "default")
    by_key = dict(zip(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist()),
                      table["ok"].to_pylist()))  # fmt: skip
    assert by_key[(1, 0)] and by_key[(1, 1)] and not by_key[(2, 0)]
    assert store.read_labels(0, "default").num_rows == 3
    arrays = store.arrays(0, oracle="default")
    assert arrays.ok.sum() == 2 and np.isnan(arrays.toxicity[~arrays.ok]).all()
    assert store.unlabelled(0, "default", max_attempts=2).num_rows == 2 * K - 3
    assert store.unlabelled(0, "default", max_attempts=3).num_rows == 2 * K - 2
    with pytest.raises(ValueError, match="max_attempts"):
        store.unlabelled(0, "default", max_attempts=0)
    label("again", [1], [0], [True])  # a good label scored twice is a bug
    with pytest.raises(DataError, match=r"prompt_id=1, sample_index=0\) has 2 good labels"):
        store.read(0, "default")
    label("dup", [2, 2], [1, 1], [False, False], oracle="other")
    with pytest.raises(DataError, match="twice in a chunk"):
        store.read_labels(0, "other")


def test_stage_markers(tmp_path):
    store = SampleStore(tmp_path)
    assert not store.is_done(4, "sampled")
    store.mark_done(4, "sampled", {"num_samples": 12})
    assert store.is_done(4, "sampled") and not store.is_done(4, "labelled-default")
    assert json.loads((tmp_path / "iter_0004/sampled.done.json").read_text())["num_samples"] == 12


def test_append_only_and_duplicate_keys(tmp_path):
    store = SampleStore(tmp_path)
    _write_iteration(store, 0, {"a": [1]})
    with pytest.raises(FileExistsError, match="append-only"):
        _write_iteration(store, 0, {"a": [2]})
    _write_iteration(store, 0, {"b": [1]})  # the same prompt again in another chunk
    with pytest.raises(DataError, match="same .prompt_id, sample_index. in several chunks"):
        store.read_samples(0)
    with pytest.raises(ValueError, match="chunk name"):
        _write_iteration(store, 1, {"../escape": [1]})


def test_commit_never_replaces_a_chunk_another_writer_committed(tmp_path):
    from etils import epath

    from jaxdetox.data.sample_store import commit_chunk

    final, tmp = epath.Path(tmp_path / "c.parquet"), epath.Path(tmp_path / ".c.parquet.tmp-1")
    final.write_text("committed by writer A")
    tmp.write_text("from writer B")
    with pytest.raises(FileExistsError, match="append-only"):
        commit_chunk(tmp, final)
    assert final.read_text() == "committed by writer A"


def test_crash_mid_write_leaves_nothing_visible_and_resumes(tmp_path, monkeypatch):
    import jaxdetox.data.sample_store as ss

    store = SampleStore(tmp_path)
    _write_iteration(store, 0, {"b000": [1, 2]})
    real_write = pq.write_table

    def dying_write(table, where, **kw):
        where.write(b"PAR1 half a file")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ss.pq, "write_table", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _write_iteration(store, 0, {"b001": [3, 4]})
    monkeypatch.setattr(ss.pq, "write_table", real_write)
    assert store.chunks(0) == ["b000"]
    assert sorted(store.done_prompt_ids(0).tolist()) == [1, 2]
    assert not list((tmp_path / "iter_0000/samples").glob(".*"))  # the writer cleaned up
    _write_iteration(store, 0, {"b001": [3, 4]})  # resume: the same chunk again
    assert store.read_samples(0).num_rows == 4 * K


_KILLED_WRITER = r"""
import os, sys
import numpy as np, pyarrow.parquet as pq
sys.path.insert(0, sys.argv[2])
from test_data_sample_store import _write_iteration
from jaxdetox.data import SampleStore
store = SampleStore(sys.argv[1])
_write_iteration(store, 0, {"b000": [1, 2]})
def die(table, where, **kw):
    where.write(b"PAR1 partial bytes of a chunk")
    where.flush()
    os._exit(9)  # a hard crash: no exception handler, no cleanup
pq.write_table = die
_write_iteration(store, 0, {"b001": [3, 4]})
"""


def test_hard_crash_in_another_process(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    root = tmp_path / "store"
    proc = subprocess.run(
        [sys.executable, str(script), str(root), str(Path(__file__).parent)], capture_output=True
    )
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    leftovers = list((root / "iter_0000/samples").glob(".*.tmp-*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0
    store = SampleStore(root)
    assert store.chunks(0) == ["b000"] and store.read_samples(0).num_rows == 2 * K
    assert store.cleanup() == 1
    _write_iteration(store, 0, {"b001": [3, 4]})
    assert sorted(store.done_prompt_ids(0).tolist()) == [1, 2, 3, 4]


def test_schema_version_is_checked(tmp_path):
    store = SampleStore(tmp_path)
    _write_iteration(store, 0, {"a": [1]})
    table = pq.read_table(tmp_path / "iter_0000/samples/a.parquet")
    meta = {b"jaxdetox": json.dumps({"schema_version": SCHEMA_VERSION + 1}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "iter_0000/samples/z.parquet")
    with pytest.raises(
        SchemaError, match=r"z\.parquet: written with sample-store schema version 2"
    ):
        store.read_samples(0)
    manifest = json.loads((tmp_path / "store.json").read_text())
    (tmp_path / "store.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(SchemaError, match="version 99"):
        SampleStore(tmp_path)


def test_batches_layout_for_nado_and_lm_steps(tmp_path):
    store = SampleStore(tmp_path)
    written = _write_iteration(store, 1, {"a": [10, 20, 30], "b": [40, 50]})
    expected = _rows_by_key(written)
    store.write_labels(
        1,
        "l0",
        oracle="default",
        prompt_ids=np.repeat([10, 20, 30, 40, 50], K),
        sample_index=np.tile(np.arange(K), 5),
        toxicity=np.linspace(0, 1, 5 * K),
        ok=np.arange(5 * K) % 4 != 0,
    )
    labels = store.read_labels(1, "default")
    tox = dict(
        zip(
            zip(labels["prompt_id"].to_pylist(), labels["sample_index"].to_pylist()),
            labels["toxicity"].to_pylist(),
        )
    )
    batches = list(store.batches(1, 4, oracle="default", seed=0, process_index=0, process_count=1))
    assert len(batches) == 4  # 15 samples → 3 full batches and one filled batch
    P = 8  # longest stored prompt (8) rounded up to a multiple of 8
    T = P + 8
    seen = []
    for b in batches:
        assert b["tokens_bt"].shape == (4, T) and b["loss_mask_bt"].dtype == np.float32
        for r in range(4):
            if not b["valid_b"][r]:
                assert b["prompt_ids_b"][r] == -1 and not b["segment_ids_bt"][r].any()
                assert not b["loss_mask_bt"][r].any() and not b["ok_b"][r]
                continue
            key = (int(b["prompt_ids_b"][r]), int(b["sample_index_b"][r]))
            seen.append(key)
            want = expected[key]
            lp, lc = len(want["prompt_tokens"]), len(want["completion_tokens"])
            assert b["prompt_lengths_b"][r] == lp and b["completion_lengths_b"][r] == lc
            row = b["tokens_bt"][r]
            assert row[P - lp : P].tolist() == want["prompt_tokens"]
            assert row[P : P + lc].tolist() == want["completion_tokens"]
            assert not row[: P - lp].any() and not row[P + lc :].any()
            seg = b["segment_ids_bt"][r]
            assert seg.tolist() == [0] * (P - lp) + [1] * (lp + lc) + [0] * (T - P - lc)
            assert b["positions_bt"][r, P - lp : P + lc].tolist() == list(range(lp + lc))
            # Targets at the positions that predict completion tokens.
            predicting = np.arange(P - 1, P - 1 + lc)
            assert np.flatnonzero(b["loss_mask_bt"][r]).tolist() == predicting.tolist()
            assert b["targets_bt"][r, predicting].tolist() == want["completion_tokens"]
            np.testing.assert_array_equal(
                b["sampling_logprobs_bt"][r, predicting], want["sampling_logprobs"]
            )
            np.testing.assert_array_equal(
                b["model_logprobs_bt"][r, predicting], want["model_logprobs"]
            )
            assert b["model_logprobs_bt"][r].sum() == pytest.approx(want["model_logprobs"].sum())
            assert b["model_logprob_b"][r] == pytest.approx(want["model_logprobs"].sum(), abs=1e-5)
            assert b["sampling_logprob_b"][r] == pytest.approx(
                want["sampling_logprobs"].sum(), abs=1e-5
            )
            ok = b["ok_b"][r]
            assert b["toxicity_b"][r] == (pytest.approx(tox[key]) if ok else 0.0)
    assert sorted(seen) == sorted(expected)  # one epoch: every sample exactly once


def test_batches_determinism_resume_and_hosts(tmp_path):
    store = SampleStore(tmp_path)
    _write_iteration(store, 0, {"a": list(range(10))})
    kw = dict(seed=3, num_epochs=None, process_index=0, process_count=1)
    a = iter(store.batches(0, 4, **kw))
    b = iter(store.batches(0, 4, **kw))
    for _ in range(3):
        np.testing.assert_array_equal(next(a)["tokens_bt"], next(b)["tokens_bt"])
    state = json.loads(json.dumps(a.get_state()))
    expected = [next(a) for _ in range(10)]  # crosses epoch boundaries
    resumed = iter(store.batches(0, 4, **kw))
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["prompt_ids_b"], want["prompt_ids_b"])
    other = next(iter(store.batches(0, 4, **{**kw, "seed": 4})))
    assert not np.array_equal(other["prompt_ids_b"], expected[0]["prompt_ids_b"])
    # Two hosts: disjoint, covering.
    per_host = []
    for host in range(2):
        keys = []
        for batch in store.batches(0, 4, seed=3, process_index=host, process_count=2):
            valid = batch["valid_b"]
            keys += list(zip(batch["prompt_ids_b"][valid], batch["sample_index_b"][valid]))
        per_host.append(keys)
    assert not set(per_host[0]) & set(per_host[1])
    assert len(per_host[0]) + len(per_host[1]) == len(set(per_host[0]) | set(per_host[1])) == 10 * K
    # Uneven shards (30 samples over 4 hosts) still give every host the same number of batches.
    counts = {
        host: sum(1 for _ in store.batches(0, 4, process_index=host, process_count=4))
        for host in range(4)
    }
    assert set(counts.values()) == {2}


def test_empty_iteration_and_fixed_lengths(tmp_path):
    store = SampleStore(tmp_path)
    with pytest.raises(EmptySplitError, match="no committed samples"):
        store.arrays(3)
    _write_iteration(store, 0, {"a": [1, 2]})
    arrays = store.arrays(0, prompt_len=12, completion_len=C)
    assert arrays.batch(np.array([0, 1]), 2)["tokens_bt"].shape == (2, 12 + C)
    with pytest.raises(ValueError, match="more than prompt_len=4"):
        store.arrays(0, prompt_len=4)


def test_prompt_to_store_flow(tmp_path):
    """Prompts from the prompt pipeline go into the store unpadded and come back intact."""
    from _tokenizer import make_tokenizer

    from jaxdetox.data import load_rtp, tokenize_prompts

    tok = make_tokenizer(bos_prefix=True)
    fixture = Path(__file__).parent / "fixtures" / "data" / "rtp_prompts.jsonl"
    tp = tokenize_prompts(load_rtp(fixture), tok, max_tokens=10)
    store = SampleStore(tmp_path)
    k = 2
    for i, begin in enumerate(range(0, len(tp), 8)):
        index = np.repeat(np.arange(begin, min(begin + 8, len(tp))), k)
        store.write_samples(
            0,
            f"b{i:03d}",
            prompt_ids=tp.ids[index],
            sample_index=np.tile(np.arange(k), len(index) // k),
            prompt_tokens=[tp.tokens[j] for j in index],
            completion_tokens=np.full((len(index), 2), 5),
            completion_lengths=np.full(len(index), 2),
            prompt_texts=[tp.texts[j] for j in index],
            completion_texts=["x"] * len(index),
        )
    table = store.read_samples(0)
    assert table.num_rows == 2 * len(tp)
    by_id = dict(zip(tp.ids.tolist(), tp.tokens))
    for pid, toks in zip(table["prompt_id"].to_pylist(), table["prompt_tokens"].to_pylist()):
        assert toks == by_id[pid].tolist()
    batch = next(iter(store.batches(0, 4, shuffle=False, process_index=0, process_count=1)))
    assert (batch["sampling_logprobs_bt"] == 0).all()  # no log-probs stored: zeros
