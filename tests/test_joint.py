"""`loop.placement: joint`: the parallel scheme's train_nado and finetune of an iteration as one
joint stage (`joint_step`), equal to the separate stages where their schedules coincide,
resumable mid-stage, recorded as the two stages.

Tolerance: the joint program computes the same sums as `nado_step` and `lm_step`, but XLA
may fuse one program of both losses otherwise than two, so a float32 reduction may round
differently (`test_train_steps` allows 1e-7 after one step; on the CPU here the weights come
out bitwise equal). Adam normalises each gradient coordinate, so such a rounding can move a
weight whose gradient is near zero by a share of the learning rate (1e-3) per step; atol
1e-5 allows that for this run's 12 LLM steps, and is 100 times below what one step
on another batch or with another teacher moves a weight (about the learning rate).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxdetox.config import ConfigError, config_from_dict
from jaxdetox.pipeline.flow import plan_stages
from jaxdetox.pipeline.joint import fused_units
from jaxdetox.pipeline.rundir import RunDir, read_manifest
from tests._tiny_run import final_weights, save_tiny_model, tiny_config

ATOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _config(model_dir: Path, **loop) -> dict:
    return tiny_config(
        model_dir,
        loop={"iterations": 3, "scheme": "parallel", "checkpoint_every": 2, **loop},
        # 16 rows, batch 8, no held-out rows: the schedules coincide on their common steps
        # (the NADO's 2, then the LLM's last 2 alone: its 2nd epoch, with the frozen teacher).
        train_nado={"epochs": 1, "heldout_fraction": 0.0},
        finetune={"epochs": 2},
        eval={"enabled": False},
    )


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    return max(float(np.max(np.abs(wa[k] - wb[k]))) for k in wa)


def _run(config: dict, out: Path) -> Path:
    from jaxdetox.commands.session import execute

    assert execute(config_from_dict(config), out, progress=False) == 0
    return out


@pytest.fixture(scope="module")
def separate_run(model_dir, tmp_path_factory):
    return _run(_config(model_dir), tmp_path_factory.mktemp("separate") / "run")


@pytest.fixture(scope="module")
def joint_run(model_dir, tmp_path_factory):
    return _run(_config(model_dir, placement="joint"), tmp_path_factory.mktemp("joint") / "run")


def test_the_plan_fuses_iterations_from_two_on(model_dir):
    stages = plan_stages(config_from_dict(_config(model_dir, placement="joint")))
    fused = [tuple((s.iteration, s.name) for s in u) for u in fused_units(stages) if len(u) > 1]
    assert fused == [((2, "train_nado"), (2, "finetune")), ((3, "train_nado"), (3, "finetune"))]
    # every stage still runs once
    assert sorted(map(str, (s for u in fused_units(stages) for s in u))) == sorted(map(str, stages))


def test_joint_placement_needs_the_parallel_scheme_and_one_batch(model_dir):
    with pytest.raises(ConfigError, match="placement 'joint' fuses the parallel scheme"):
        config_from_dict(_config(model_dir, placement="joint", scheme="sequential"))
    bad = _config(model_dir, placement="joint")
    bad["train_nado"]["batch_size"] = 4
    with pytest.raises(ConfigError, match=r"train_nado.batch_size \(4\) must equal finetune"):
        config_from_dict(bad)
    with pytest.raises(ConfigError, match="'colocated', 'split', 'jobs' or 'joint'"):
        config_from_dict(_config(model_dir, placement="fused"))


@pytest.mark.slow
def test_joint_stage_equals_the_separate_stages(separate_run, joint_run):
    assert _max_diff(separate_run, joint_run) < ATOL
    records = {(r["iteration"], r["stage"]): r for r in read_manifest(joint_run)}
    reference = {(r["iteration"], r["stage"]): r for r in read_manifest(separate_run)}
    assert {k: r["inputs"] for k, r in records.items()} == {
        k: r["inputs"] for k, r in reference.items()
    }
    for i in (2, 3):
        for stage, steps in (("train_nado", 2), ("finetune", 4)):
            outputs = records[i, stage]["outputs"]
            assert outputs["joint"] == "joint" and outputs["steps"] == steps
            assert "joint" not in reference[i, stage]["outputs"]
    metrics = [json.loads(x) for x in (joint_run / "metrics.jsonl").read_text().splitlines()]
    joint = [m for m in metrics if m["stage"] == "joint" and m["iteration"] == 2]
    assert [("nado/bce" in m, "lm/loss" in m) for m in joint] == [(True, True)] * 2 + [
        (False, True)
    ] * 2


@pytest.mark.slow
def test_a_killed_joint_stage_resumes_to_the_same_weights(
    joint_run, model_dir, tmp_path, monkeypatch
):
    # Iteration 3 redone from the finished run's iterations 1-2 (its joint stage killed at
    # step 3 of 4, past the checkpoint of step 2 where the LLM goes on alone), then resumed.
    out = tmp_path / "run"
    shutil.copytree(joint_run, out)
    manifest = out / "manifest.json"
    records = json.loads(manifest.read_text())
    redo = {(3, "train_nado"), (3, "finetune")}
    manifest.write_text(
        json.dumps([r for r in records if (r["iteration"], r["stage"]) not in redo])
    )
    for path in (out / "iter_003" / "train_nado", out / "iter_003" / "finetune", out / "final"):
        shutil.rmtree(path)
    config = _config(model_dir, placement="joint")

    class Killed(Exception):
        pass

    log = RunDir.log

    def dying_log(self, iteration, stage, step, scalars):
        log(self, iteration, stage, step, scalars)
        if (iteration, stage, step) == (3, "joint", 3):
            raise Killed

    monkeypatch.setattr(RunDir, "log", dying_log)
    with pytest.raises(Killed):
        _run(config, out)
    assert RunDir(out).record(3, "train_nado")["status"] == "failed"
    assert RunDir(out).record(3, "finetune") is None
    monkeypatch.setattr(RunDir, "log", log)
    _run(config, out)
    for stage in ("train_nado", "finetune"):
        assert RunDir(out).record(3, stage)["outputs"]["resumed_from_step"] == 2
    assert _max_diff(joint_run, out) == 0.0  # the same programs on the same mesh: bitwise
