"""`RunDir.adopt`: one run takes over another's finished stages (records + linked outputs)."""

from __future__ import annotations

import os

import pytest

from jaxdetox.data import SampleStore
from jaxdetox.pipeline.rundir import RunDir


def _finished(run: RunDir, iteration: int, stage: str, inputs: dict, outputs: dict) -> None:
    run.update_record(
        iteration, stage, status="done", inputs=inputs, outputs=outputs, seconds=2.0,
        role="trainer", devices=1, started=100.0,
    )  # fmt: skip


def test_adopt_links_outputs_and_copies_records(tmp_path):
    source, target = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    store = SampleStore(source.samples)
    (store.iteration_dir(1) / "samples").mkdir(parents=True)
    (store.iteration_dir(1) / "samples" / "part-0.parquet").write_bytes(b"rows")
    _finished(source, 1, "sample", {"lm": 0}, {"samples": 1, "prompts": 4})
    artifact = source.stage_dir(1, "train_nado") / "artifact"
    artifact.mkdir(parents=True)
    (artifact / "params").write_bytes(b"weights")
    _finished(source, 1, "train_nado", {"nado": 0, "samples": 1}, {"steps": 3})
    source.update_record(1, "finetune", status="running", inputs={"lm": 0})

    assert target.adopt(source, 1, "sample") and target.adopt(source, 1, "train_nado")
    linked = target.root / "samples" / "iter_0001" / "samples" / "part-0.parquet"
    assert linked.read_bytes() == b"rows" and os.stat(linked).st_nlink == 2
    copied = target.stage_dir(1, "train_nado") / "artifact" / "params"
    assert copied.read_bytes() == b"weights" and os.stat(copied).st_nlink == 2
    record = target.record(1, "train_nado")
    assert record["status"] == "done" and record["inputs"] == {"nado": 0, "samples": 1}
    assert record["outputs"] == {"steps": 3, "adopted_from": str(source.root)}
    assert record["seconds"] == 2.0 and record["device_seconds"] == 2.0
    # Already there: nothing to do; a stage the source has not finished cannot be adopted.
    assert not target.adopt(source, 1, "sample")
    with pytest.raises(ValueError, match="finetune of iteration 1 is not done"):
        target.adopt(source, 1, "finetune")
    with pytest.raises(ValueError, match="eval of iteration 2 is not done"):
        target.adopt(source, 2, "eval")


def test_drop_stage_checkpoints_keeps_the_artifact(tmp_path):
    run = RunDir(tmp_path)
    stage = run.stage_dir(2, "finetune")
    for name in ("artifact", "ckpt", "ckpt_extra"):
        (stage / name / "0").mkdir(parents=True)
    run.drop_stage_checkpoints(2, "finetune")
    assert sorted(p.name for p in stage.iterdir()) == ["artifact"]
    run.drop_stage_checkpoints(3, "finetune")  # no such stage: nothing to do
