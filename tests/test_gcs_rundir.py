"""Run directories on `gs://`: the run directory (config, manifest, metrics, TensorBoard), the
sample store, orbax checkpoints and the final export, against a local fake GCS server.

The fake (gcp-storage-emulator, in-process) speaks the GCS JSON API, so this exercises the
real non-local code paths: etils.epath → fsspec → gcsfs for files, and orbax → tensorstore's
`gcs` driver for the checkpoint arrays (both pointed at the fake by their documented
endpoint variables).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdetox import fileio
from jaxdetox.data import SampleStore
from jaxdetox.train.checkpoint import Checkpointer, CheckpointError
from jaxdetox.train.state import abstract_like
from tests._fake_gcs import fake_gcs

emulator = pytest.importorskip("gcp_storage_emulator.server")
gcsfs = pytest.importorskip("gcsfs")

BUCKET = "jd-test-bucket"


@pytest.fixture(scope="module")
def gcs():
    """A fake GCS endpoint with one bucket; yields `gs://BUCKET`."""
    with fake_gcs(BUCKET) as root:
        yield root


def _files(root) -> list[str]:
    """Every file under an epath root, relative (explicit walk)."""
    out, stack = [], [fileio.as_path(root)]
    while stack:
        for p in stack.pop().iterdir():
            if p.is_dir():
                stack.append(p)
            else:
                out.append(str(p)[len(str(root)) + 1 :])
    return sorted(out)


def test_pathlib_would_break_the_uri():
    from jaxdetox.cli import build_parser

    args = build_parser().parse_args(["run", "c.yaml", "--out", "gs://b/runs/x"])
    assert str(args.out) == "gs://b/runs/x" and not fileio.is_local(args.out)


def test_run_directory_round_trip(gcs):
    from jaxdetox.commands.session import open_run, resolve_run_config
    from jaxdetox.config import load_config

    out = fileio.as_path(f"{gcs}/runs/a")
    config = load_config(None, ["name=gcs", "loop.iterations=3"])
    run = open_run(config, out)
    assert run.root.exists() and str(run.root) == f"{gcs}/runs/a"
    # A rerun resolves the saved config from gs:// and refuses a different one.
    assert resolve_run_config(None, out, []).name == "gcs"
    with pytest.raises(ValueError, match="loop.iterations: 3 -> 4"):
        resolve_run_config(None, out, ["loop.iterations=4"])

    run.update_record(1, "sample", status="running", inputs={"lm": 0})
    run.update_record(1, "sample", status="done", inputs={"lm": 0}, outputs={"n": 8}, seconds=1)
    run.update_record(1, "train_nado", status="done", inputs={"nado": 0, "samples": 1})
    assert run.is_done(1, "sample") and run.is_done(1, "train_nado")
    assert [r["stage"] for r in run.manifest()] == ["sample", "train_nado"]
    for step in (1, 2, 3):
        run.log(1, "train_nado", step, {"nado/loss": 1.0 / step})
    run.truncate_metrics(1, "train_nado", after_step=2)
    assert [r["step"] for r in run.metrics()] == [1, 2]
    run.close()
    files = _files(run.root)
    assert {"config.yaml", "manifest.json", "metrics.jsonl"} <= set(files)
    events = [f for f in files if f.startswith("tensorboard/events.out.tfevents")]
    assert len(events) == 1 and (run.root / events[0]).stat().length > 0
    assert not [f for f in files if ".tmp-" in f]  # whole-object writes, no temp objects


def test_sample_store_round_trip(gcs):
    store = SampleStore(f"{gcs}/runs/b/samples")
    rng = np.random.default_rng(0)
    n = 6
    lengths = np.array([3, 1, 4, 2, 4, 1])
    completions = rng.integers(3, 50, (n, 4)).astype(np.int32)
    store.write_samples(
        1, "prompts-0-2-p0", prompt_ids=[5, 5, 5, 9, 9, 9], sample_index=[0, 1, 2] * 2,
        prompt_tokens=[[1, 2]] * 3 + [[3]] * 3, completion_tokens=completions,
        completion_lengths=lengths, prompt_texts=["a"] * 3 + ["b"] * 3,
        completion_texts=[f"c{i}" for i in range(n)],
        sampling_logprobs=-rng.random((n, 4)).astype(np.float32),
    )  # fmt: skip
    with pytest.raises(FileExistsError, match="append-only"):
        store.write_samples(
            1, "prompts-0-2-p0", prompt_ids=[1], sample_index=[0], prompt_tokens=[[1]],
            completion_tokens=[[2]], prompt_texts=["x"], completion_texts=["y"],
        )  # fmt: skip
    store.write_labels(
        1, "l0", oracle="default", prompt_ids=[5, 5, 5, 9, 9, 9], sample_index=[0, 1, 2] * 2,
        toxicity=[0.1, 0.9, np.nan, 0.2, 0.3, 0.4], ok=[True, True, False, True, True, True],
    )  # fmt: skip
    store.mark_done(1, "sampled")

    reopened = SampleStore(f"{gcs}/runs/b/samples")
    assert reopened.iterations() == [1] and reopened.is_done(1, "sampled")
    table = reopened.read(1, "default")
    assert table["prompt_id"].to_pylist() == [5, 5, 5, 9, 9, 9]
    got = table["completion_tokens"].to_pylist()
    assert got == [completions[i, : lengths[i]].tolist() for i in range(n)]
    assert table["ok"].to_pylist() == [True, True, False, True, True, True]
    assert reopened.unlabelled(1, "default")["sample_index"].to_pylist() == [2]
    (batch,) = list(reopened.batches(1, 8, oracle="default", shuffle=False))
    assert batch["valid_b"].sum() == n and batch["tokens_bt"].shape[0] == 8
    assert reopened.cleanup() == 0  # nothing temporary was left on the bucket


def test_checkpoint_round_trip_and_mismatch(gcs):
    directory = f"{gcs}/runs/c/iter_001/finetune/ckpt"
    state = {"w": jnp.arange(12.0).reshape(3, 4), "opt": {"mu": jnp.ones(5), "count": jnp.int32(3)}}
    with Checkpointer(directory, keep=1, async_save=False) as ckpt:
        ckpt.save(4, state, data_state={"samples": {"pos": 7}}, meta={"step": 4})
        ckpt.save(8, jax.tree.map(lambda x: x * 2, state), meta={"step": 8})
    with Checkpointer(directory, keep=1) as ckpt:
        assert ckpt.all_steps() == [8]  # keep=1 deleted step 4 on the bucket
        restored, data, meta = ckpt.restore(abstract_like(state))
        assert meta == {"step": 8} and data == {}
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b) * 2)
        wrong = {**state, "w": jnp.zeros((3, 5))}
        with pytest.raises(CheckpointError, match=r"w: checkpoint has \(3, 4\)"):
            ckpt.restore(abstract_like(wrong))


def test_local_dir_uploads_what_local_writers_made(gcs):
    target = fileio.as_path(f"{gcs}/runs/d/final/model")
    with fileio.local_dir(target) as local:
        assert fileio.is_local(local)
        (local / "config.json").write_text(json.dumps({"a": 1}))
        (local / "sub").mkdir()
        (local / "sub" / "w.bin").write_bytes(b"\x00\x01")
    assert _files(target) == ["config.json", "sub/w.bin"]
    assert (target / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    assert fileio.local_file(target / "x.sqlite") != target / "x.sqlite"
    assert fileio.is_local(fileio.local_file(target / "x.sqlite"))


def test_report_reads_and_writes_gs(gcs, tmp_path):
    from jaxdetox.cli import main
    from tests.test_report import _eval, _stage

    run = fileio.as_path(f"{gcs}/runs/e")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text("method: pr_sequential\n")
    records = [_eval(0, 0.2, 0.6, 20.0), _stage(1, "finetune", 5.0), _eval(1, 0.1, 0.4, 21.0)]
    (run / "manifest.json").write_text(json.dumps(records))
    assert main(["report", str(run)]) == 0  # written next to the run, on the bucket
    rows = json.loads((run / "results.json").read_text())
    assert [r["method"] for r in rows] == ["base", "pr_sequential"]
    assert (run / "toxicity_per_iteration.png").read_bytes()[:4] == b"\x89PNG"
    assert "| pr_sequential |" in (run / "report.md").read_text()
