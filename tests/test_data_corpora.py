"""Corpus pipeline: packing invariants, determinism, resume, host sharding, global arrays."""

import json
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from _tokenizer import make_tokenizer

from jaxdetox.data import (
    CorpusConfig,
    corpus_dataset,
    next_token_targets,
    positions_from_segments,
    split_host_keys,
    to_global,
)
from jaxdetox.data.readers import JsonlSource, open_source

FIXTURES = Path(__file__).parent / "fixtures" / "data"
CORPUS = FIXTURES / "corpus.jsonl"
SEQ = 32


def _config(**kw):
    base = dict(source=str(CORPUS), seq_len=SEQ, global_batch_size=2, num_epochs=1, seed=0)
    return CorpusConfig(**{**base, **kw})


def _reference_docs(tok, bos=False):
    """Each corpus document tokenised directly (the independent reference)."""
    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()]
    prefix = [tok.bos_token_id] if bos else []
    return [tuple(prefix + tok(t, add_special_tokens=False)["input_ids"] + [2]) for t in texts]


def _batches(config, tok=None, **kw):
    return list(
        corpus_dataset(config, tok or make_tokenizer(), process_index=0, process_count=1, **kw)
    )


def _documents(batches, eos=2):
    """Rebuild documents: the stream of real tokens (rows in order) split after each EOS."""
    stream = np.concatenate([b["tokens_bt"][b["segment_ids_bt"] != 0] for b in batches])
    docs, start = [], 0
    for i in np.flatnonzero(stream == eos):
        docs.append(tuple(stream[start : i + 1].tolist()))
        start = i + 1
    assert start == len(stream), "stream must end with a complete document"
    return docs


def _check_row_invariants(batch):
    tokens, seg, pos = batch["tokens_bt"], batch["segment_ids_bt"], batch["positions_bt"]
    targets, mask = batch["targets_bt"], batch["loss_mask_bt"]
    for r in range(tokens.shape[0]):
        s = seg[r]
        n_real = int((s != 0).sum())
        assert (s[:n_real] != 0).all() and (s[n_real:] == 0).all(), "padding only at the end"
        if n_real == 0:  # a filler row of the last batch
            assert not tokens[r].any() and not mask[r].any() and not pos[r].any()
            continue
        ids = s[:n_real]
        assert ids[0] == 1 and set(np.diff(ids)) <= {0, 1}, "segments numbered 1..n in order"
        for t in range(SEQ):
            same_next = t + 1 < SEQ and s[t] != 0 and s[t + 1] == s[t]
            assert mask[r, t] == (1.0 if same_next else 0.0)
            assert targets[r, t] == (tokens[r, t + 1] if same_next else 0)
            if s[t] != 0:
                first = np.flatnonzero(s == s[t])[0]
                assert pos[r, t] == t - first
            else:
                assert pos[r, t] == 0


def test_targets_and_positions_match_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 6, size=rng.integers(1, 5))
        seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
        seg = np.concatenate([seg, np.zeros(max(0, 16 - len(seg)), int)])[:16][None]
        tokens = rng.integers(3, 50, size=seg.shape)
        doc_mask = rng.integers(0, 2, size=seg.shape)
        targets, mask = next_token_targets(tokens, seg, doc_mask)
        pos = positions_from_segments(seg)
        for t in range(16):
            ok = t < 15 and seg[0, t] != 0 and seg[0, t + 1] == seg[0, t]
            assert targets[0, t] == (tokens[0, t + 1] if ok else 0)
            assert mask[0, t] == float(ok and doc_mask[0, t + 1] == 1)
            expect = t - np.flatnonzero(seg[0] == seg[0, t])[0] if seg[0, t] else 0
            assert pos[0, t] == expect


@pytest.mark.parametrize("shuffle", [False, True])
def test_packing_loses_and_duplicates_nothing(shuffle):
    tok = make_tokenizer()
    ref = _reference_docs(tok)
    assert max(len(d) for d in ref) > SEQ  # some documents must be split across rows
    assert len(set(ref)) == len(ref)
    batches = _batches(_config(shuffle=shuffle, global_batch_size=3))
    for b in batches:
        assert b["tokens_bt"].shape == (3, SEQ) and b["tokens_bt"].dtype == np.int32
        _check_row_invariants(b)
    docs = _documents(batches)
    if shuffle:
        assert sorted(docs) == sorted(ref) and docs != ref
    else:
        assert docs == ref
    total_real = sum(int((b["segment_ids_bt"] != 0).sum()) for b in batches)
    assert total_real == sum(len(d) for d in ref)


def test_short_last_batch_is_filled_with_padding_rows():
    batches = _batches(_config(global_batch_size=4))
    real_rows = (batches[-1]["segment_ids_bt"] != 0).any(axis=1)
    assert 0 < real_rows.sum() < 4, "this fixture should leave a partial last batch"
    assert real_rows.tolist() == sorted(real_rows.tolist(), reverse=True)
    for key, value in batches[-1].items():
        assert (value[~real_rows] == 0).all(), key


def test_bos_and_prompt_field_loss_mask(tmp_path):
    tok = make_tokenizer(bos_prefix=True)
    path = tmp_path / "pairs.jsonl"
    pairs = [{"q": f"question {i}?", "a": f" answer {i}."} for i in range(6)]
    path.write_text("\n".join(json.dumps(p) for p in pairs))
    cfg = CorpusConfig(
        source=str(path),
        text_field="a",
        prompt_field="q",
        seq_len=128,
        global_batch_size=1,
        num_epochs=1,
        shuffle=False,
    )
    (b,) = _batches(cfg, tok)
    row_tokens, seg, mask = b["tokens_bt"][0], b["segment_ids_bt"][0], b["loss_mask_bt"][0]
    for i, p in enumerate(pairs):
        doc = row_tokens[seg == i + 1]
        q = tok(p["q"], add_special_tokens=False)["input_ids"]
        a = tok(p["a"], add_special_tokens=False)["input_ids"]
        assert doc.tolist() == [1] + q + a + [2]  # tokenizer's own BOS convention
        # Loss only where the target is an answer token (or EOS).
        doc_mask = mask[np.flatnonzero(seg == i + 1)]
        assert doc_mask.tolist() == [0.0] * len(q) + [1.0] * (len(a) + 1) + [0.0]


def test_same_seed_same_batches_other_seed_differs():
    a = _batches(_config(shuffle=True, seed=5))
    b = _batches(_config(shuffle=True, seed=5))
    c = _batches(_config(shuffle=True, seed=6))
    assert all(np.array_equal(x["tokens_bt"], y["tokens_bt"]) for x, y in zip(a, b))
    assert len(a) == len(b)
    assert any(not np.array_equal(x["tokens_bt"], y["tokens_bt"]) for x, y in zip(a, c))


def test_epochs_reshuffle():
    tok = make_tokenizer()
    ref = _reference_docs(tok)
    batches = _batches(_config(shuffle=True, num_epochs=2, global_batch_size=1))
    docs = _documents(batches)
    assert len(docs) == 2 * len(ref)
    first, second = docs[: len(ref)], docs[len(ref) :]
    assert sorted(first) == sorted(ref) == sorted(second) and first != second


@pytest.mark.parametrize("stop", [1, 2, 3, 7])
def test_resume_from_saved_state_gives_same_next_batches(stop):
    ds = corpus_dataset(
        _config(shuffle=True, num_epochs=None), make_tokenizer(), process_index=0, process_count=1
    )
    it = iter(ds)
    for _ in range(stop):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = [next(it) for _ in range(12)]  # crosses the first epoch boundary
    fresh = iter(
        corpus_dataset(
            _config(shuffle=True, num_epochs=None),
            make_tokenizer(),
            process_index=0,
            process_count=1,
        )
    )
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_iterator_state_in_orbax_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    def make():
        return iter(
            corpus_dataset(
                _config(shuffle=True, num_epochs=None),
                make_tokenizer(),
                process_index=0,
                process_count=1,
            )
        )

    it = make()
    for _ in range(4):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = [next(it)["tokens_bt"] for _ in range(3)]
        restored = make()
        mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    for want in expected:
        np.testing.assert_array_equal(next(restored)["tokens_bt"], want)


def test_two_hosts_see_disjoint_shards_covering_the_data():
    tok = make_tokenizer()
    ref = _reference_docs(tok)
    cfg = _config(shuffle=True, global_batch_size=2)
    per_host = [
        _documents(list(corpus_dataset(cfg, tok, process_index=i, process_count=2)))
        for i in range(2)
    ]
    host0, host1 = (set(d) for d in per_host)
    assert host0 and host1 and not (host0 & host1)
    assert sorted(per_host[0] + per_host[1]) == sorted(ref)
    # Each host's batch is half the global batch.
    b = next(iter(corpus_dataset(cfg, tok, process_index=1, process_count=2)))
    assert b["tokens_bt"].shape == (1, SEQ)
    with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
        corpus_dataset(cfg, tok, process_index=0, process_count=3)


@pytest.mark.filterwarnings("ignore")
def test_sources_give_identical_batches(tmp_path):
    """jsonl, parquet, HF save_to_disk and a locally built tfds dataset of the same texts."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_data_readers import _build_tiny_tfds

    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()]
    pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf"))
    tfds_builder = _build_tiny_tfds(tmp_path / "tfds", texts)
    cfg = _config(shuffle=False)
    ref = _batches(cfg)
    for source in [tmp_path / "c.parquet", tmp_path / "hf"]:
        got = _batches(_config(source=str(source), shuffle=False))
        assert len(got) == len(ref)
        for x, y in zip(got, ref):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"{source} {key}")
    # tfds stores examples in its own order: compare the documents.
    got = _batches(_config(source=str(tfds_builder.data_dir), shuffle=False))
    assert sorted(_documents(got)) == sorted(_documents(ref))


def test_missing_text_field_fails_early():
    from jaxdetox.data import MissingFieldError

    with pytest.raises(MissingFieldError, match=r"corpus\.jsonl:1: missing field 'body'.*'text'"):
        _batches(_config(text_field="body"))


def test_to_global_on_eight_devices():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    batch = next(
        iter(
            corpus_dataset(
                _config(global_batch_size=8), make_tokenizer(), process_index=0, process_count=1
            )
        )
    )
    out = to_global(batch, sharding)
    for key, value in batch.items():
        assert out[key].shape == value.shape and out[key].sharding == sharding
        np.testing.assert_array_equal(np.asarray(out[key]), value)
        rows = {(s.index[0].start, s.index[0].stop) for s in out[key].addressable_shards}
        assert len(rows) == 4  # split over the data axis, replicated over tensor


def test_to_global_never_truncates_host_ids(tmp_path):
    """Sample-store batches carry stable 63-bit prompt ids: they stay on the host exactly;
    to_global refuses them (naming the key) instead of keeping the low 32 bits."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxdetox.data import SampleStore

    store = SampleStore(tmp_path)
    big = [2**62 + 5, 7]
    store.write_samples(
        0, "c", prompt_ids=big, sample_index=[0, 0], prompt_tokens=[[1, 5], [1, 6, 7]],
        completion_tokens=[[8, 9], [10]], prompt_texts=["a", "b"], completion_texts=["c", "d"],
    )  # fmt: skip
    batch = next(iter(store.batches(0, 2, shuffle=False, process_index=0, process_count=1)))
    assert batch["prompt_ids_b"].dtype == np.int64
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:2]), ("data",)), PartitionSpec("data"))
    with pytest.raises(ValueError, match="'prompt_ids_b' .*outside int32.*4611686018427387909"):
        to_global(batch, sharding)
    model, host = split_host_keys(batch)
    assert set(host) == {"prompt_ids_b", "sample_index_b"}
    assert sorted(host["prompt_ids_b"].tolist()) == sorted(big)
    out = to_global(model, sharding)
    assert set(out) == set(model)
    for key, value in model.items():
        np.testing.assert_array_equal(np.asarray(out[key]), value, err_msg=key)
    # A 64-bit column whose values fit is carried exactly (as int32); strings are refused.
    small = to_global({"ids_b": np.array([3, -4], np.int64)}, sharding)["ids_b"]
    assert small.dtype == np.int32 and np.asarray(small).tolist() == [3, -4]
    with pytest.raises(ValueError, match="'texts_b' has dtype <U1"):
        to_global({"texts_b": np.array(["a", "b"])}, sharding)


def test_jsonl_source_and_pipeline_pickle_for_worker_processes():
    import pickle

    ds = corpus_dataset(_config(), make_tokenizer(), process_index=0, process_count=1)
    clone_ds = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(next(iter(clone_ds))["tokens_bt"], next(iter(ds))["tokens_bt"])

    src = JsonlSource(CORPUS)
    _ = src[3]  # opens the descriptor
    clone = pickle.loads(pickle.dumps(src))
    assert clone[3] == src[3] and clone.describe(3) == src.describe(3)
    assert open_source(CORPUS)[0]["id"] == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_row_logits_equal_documents_run_separately(family):
    """Attention must not cross packed documents: the model (docs/interfaces.md call) gives
    each segment of a packed row the logits of that document run on its own."""
    from flax import nnx

    from jaxdetox import models

    tok = make_tokenizer()
    extra = {"hidden_act": "gelu_new", "norm_eps": 1e-5} if family == "gpt2" else {}
    config = models.ModelConfig(
        family=family,
        vocab_size=len(tok),
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2 if family == "llama" else 4,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
        **extra,
    )
    graphdef, state = nnx.split(models.build_model(config, 0))

    @jax.jit
    def logits(tokens_bt, positions_bt, segment_ids_bt):
        model = nnx.merge(graphdef, state)
        return model(tokens_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt)[0]

    cfg = _config(global_batch_size=2)
    batch = next(  # rows with several documents each
        b
        for b in corpus_dataset(cfg, tok, process_index=0, process_count=1)
        if (b["segment_ids_bt"].max(axis=1) >= 2).all() and b["segment_ids_bt"].max() >= 3
    )
    tokens, seg = batch["tokens_bt"], batch["segment_ids_bt"]
    # Rows: the packed rows; the same rows as plain causal sequences; each document alone at
    # the start of its own row (plain causal: what follows it cannot affect it). One call.
    docs = [(r, np.flatnonzero(seg[r] == s)) for r in range(2) for s in range(1, seg[r].max() + 1)]
    alone_bt = np.zeros((len(docs), SEQ), np.int32)
    for i, (r, cols) in enumerate(docs):
        alone_bt[i, : len(cols)] = tokens[r, cols]
    causal_pos = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (2 + len(docs), SEQ))
    out = np.asarray(
        logits(
            np.concatenate([tokens, tokens, alone_bt]),
            np.concatenate([batch["positions_bt"], causal_pos]),
            np.concatenate([seg, np.ones((2 + len(docs), SEQ), np.int32)]),
        )
    )
    packed, plain, alone = out[:2], out[2:4], out[4:]
    crossed = 0.0
    for i, (r, cols) in enumerate(docs):
        ref = alone[i, : len(cols)]
        np.testing.assert_allclose(packed[r, cols], ref, atol=1e-5, rtol=1e-5)
        if cols[0] > 0:
            crossed = max(crossed, float(np.abs(plain[r, cols] - ref).max()))
    assert crossed > 1e-3, "without segment ids later documents see earlier ones"


_HOST_SCRIPT = r"""
import json, os, sys
pid, port, out, corpus, tests_dir = sys.argv[1:]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, tests_dir)
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from _tokenizer import make_tokenizer
from jaxdetox.data import CorpusConfig, corpus_dataset, to_global

cfg = CorpusConfig(source=corpus, seq_len=32, global_batch_size=8, num_epochs=1, seed=1)
batches = list(corpus_dataset(cfg, make_tokenizer()))  # hosts from jax.process_index/count
mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
glob = to_global(batches[0], NamedSharding(mesh, PartitionSpec("data")))
gathered = multihost_utils.process_allgather(glob["tokens_bt"], tiled=True)
stream = np.concatenate([b["tokens_bt"][b["segment_ids_bt"] != 0] for b in batches])
json.dump({"stream": stream.tolist(), "local": batches[0]["tokens_bt"].tolist(),
           "global_shape": list(glob["tokens_bt"].shape), "gathered": np.asarray(gathered).tolist()},
          open(out, "w"))
"""


@pytest.mark.slow
def test_two_real_jax_processes_build_global_batches(tmp_path):
    """Two JAX processes (4 CPU devices each, gloo): disjoint shards, one global array."""
    from _jax_processes import run_jax_processes

    args = [str(CORPUS), str(Path(__file__).parent)]
    h0, h1 = run_jax_processes(_HOST_SCRIPT, tmp_path, args, timeout=240)
    ref = _reference_docs(make_tokenizer())

    def split_docs(stream):
        ends = np.flatnonzero(np.asarray(stream) == 2) + 1
        return [tuple(d) for d in np.split(np.asarray(stream), ends)[:-1]]

    d0, d1 = split_docs(h0["stream"]), split_docs(h1["stream"])
    assert not set(d0) & set(d1) and sorted(d0 + d1) == sorted(ref)
    assert h0["global_shape"] == [8, SEQ] and np.asarray(h0["local"]).shape == (4, SEQ)
    expected = np.concatenate([h0["local"], h1["local"]])
    np.testing.assert_array_equal(h0["gathered"], expected)
    np.testing.assert_array_equal(h1["gathered"], expected)
