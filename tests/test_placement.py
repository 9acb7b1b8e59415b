"""The parallel scheme's placements: colocated, split (threads on sub-meshes of 8 fake CPU
devices) and jobs (one process per role) end with the same weights; roles wait for their
inputs, refuse wrong versions, and a killed role resumes.

Equality is exact: every training role runs on a 2-device mesh in every placement, so its
programs are the same; the sampler's mesh may differ (4 devices under `split`) because
sampling has no cross-example reduction — the drawn tokens, all that training consumes, are
the same.
"""

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from jaxdetox.config import config_from_dict
from jaxdetox.pipeline.flow import VersionError, plan_stages
from jaxdetox.pipeline.placement import role_devices, run_role
from jaxdetox.pipeline.rundir import RunDir, read_manifest
from tests._run_cli import finish, start_run
from tests._tiny_run import final_weights, save_tiny_model, tiny_config, write_config

ITERATIONS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _config(model_dir: Path, **loop) -> dict:
    return tiny_config(
        model_dir,
        # 12 finetune steps per iteration, checkpoints every 2: a kill lands mid-stage.
        loop={"iterations": ITERATIONS, "scheme": "parallel", "checkpoint_every": 2, **loop},
        train_nado={"epochs": 1},
        finetune={"epochs": 6},
        eval={"enabled": False},
    )


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


@pytest.fixture(scope="module")
def colocated_run(model_dir, tmp_path_factory):
    """The reference: the parallel scheme colocated on a 2-device mesh (its own process)."""
    root = tmp_path_factory.mktemp("colocated")
    config = write_config(root / "colocated.yaml", _config(model_dir))
    out = root / "run"
    finish(start_run(config, out))
    return out


def test_role_devices_resolve_counts_and_lists(model_dir):
    counts = config_from_dict(
        _config(model_dir, placement="split", roles={"sampler": 4, "nado": 2, "lm": 2})
    )
    devices = list(range(8))
    assert role_devices(counts, devices) == {
        "sampler": [0, 1, 2, 3], "nado": [4, 5], "lm": [6, 7],
    }  # fmt: skip
    lists = config_from_dict(
        _config(model_dir, placement="split", roles={"sampler": [7], "nado": [0, 1], "lm": [3]})
    )
    assert role_devices(lists, devices) == {"sampler": [7], "nado": [0, 1], "lm": [3]}
    too_many = config_from_dict(
        _config(model_dir, placement="split", roles={"sampler": 6, "nado": 2, "lm": 2})
    )
    with pytest.raises(ValueError, match=r"loop.roles.lm: device indices \[8, 9\]"):
        role_devices(too_many, devices)


@pytest.mark.slow
def test_split_on_sub_meshes_equals_colocated(colocated_run, model_dir, tmp_path):
    from jaxdetox.commands.session import execute

    roles = {"sampler": 4, "nado": 2, "lm": 2}  # of the suite's 8 fake CPU devices
    config = config_from_dict(_config(model_dir, placement="split", roles=roles))
    out = tmp_path / "split"
    assert execute(config, out, progress=False) == 0
    _assert_same_weights(colocated_run, out)
    records = read_manifest(out)
    devices = {r["role"]: r["devices"] for r in records}
    assert devices == {"sampler": 4, "nado": 2, "lm": 2}
    for r in records:
        assert r["device_seconds"] == pytest.approx(r["seconds"] * r["devices"], abs=0.01)
    # the same flow, stage for stage
    flow = {(r["iteration"], r["stage"]): r["inputs"] for r in records}
    reference = {(r["iteration"], r["stage"]): r["inputs"] for r in read_manifest(colocated_run)}
    assert flow == reference


def _finetune_steps(out: Path, iteration: int) -> int:
    path = out / "metrics.lm.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(line) for line in path.read_text().splitlines() if line]
    return sum(r["stage"] == "finetune" and r["iteration"] == iteration for r in lines)


@pytest.mark.slow
def test_jobs_one_process_per_role_survives_a_killed_role(colocated_run, model_dir, tmp_path):
    config = write_config(
        tmp_path / "jobs.yaml", _config(model_dir, placement="jobs", poll_seconds=0.2)
    )
    out = tmp_path / "run"
    procs = {role: start_run(config, out, "--role", role) for role in ("sampler", "nado", "lm")}
    deadline = time.time() + 600
    while _finetune_steps(out, iteration=2) < 5:  # the LLM trainer, mid-iteration 2
        assert procs["lm"].poll() is None, procs["lm"].communicate()[0]
        assert time.time() < deadline, "iteration 2's finetune never started"
        time.sleep(0.01)
    procs["lm"].send_signal(signal.SIGKILL)
    procs["lm"].wait()
    record = RunDir(out).record(2, "finetune")
    assert record["status"] == "running"  # killed mid-stage
    assert "the run completes when the other roles finish" in finish(procs["nado"])
    restarted = start_run(config, out, "--role", "lm")
    finish(restarted)
    finish(procs["sampler"])

    _assert_same_weights(colocated_run, out)
    merged = json.loads((out / "manifest.json").read_text())  # written by the last role
    assert {(r["iteration"], r["stage"]) for r in merged if r["status"] == "done"} == {
        (s.iteration, s.name) for s in plan_stages(config_from_dict(_config(model_dir)))
        if s.name != "export"
    }  # fmt: skip
    assert {r["role"] for r in merged} == {"sampler", "nado", "lm"}
    resumed = [r for r in merged if r["iteration"] == 2 and r["stage"] == "finetune"][0]
    assert resumed["outputs"]["resumed_from_step"] > 0
    for role in ("sampler", "nado", "lm"):  # each role wrote only its own files
        assert (out / f"manifest.{role}.json").exists()
        assert (out / f"metrics.{role}.jsonl").exists() or role == "sampler"


@pytest.mark.slow
def test_a_role_refuses_inputs_of_the_wrong_version(colocated_run, model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(colocated_run, run)
    records = json.loads((run / "manifest.json").read_text())
    records = [r for r in records if (r["iteration"], r["stage"]) != (3, "finetune")]
    shutil.rmtree(run / "iter_003" / "finetune")
    config = config_from_dict(_config(model_dir, placement="jobs", poll_seconds=0.05))

    # NADO_2 recorded as trained from NADO_0: finetune 3 (teacher NADO_2) must refuse it.
    wrong = [
        {**r, "inputs": {**r["inputs"], "nado": 0}}
        if (r["iteration"], r["stage"]) == (2, "train_nado") else r
        for r in records
    ]  # fmt: skip
    (run / "manifest.json").write_text(json.dumps(wrong))
    with pytest.raises(VersionError, match=r"NADO_2 made by train_nado of iteration 2 from "
                       r"LLM_0, NADO_1, S_0, but .* was made from LLM_0, NADO_0, S_0"):  # fmt: skip
        run_role(config, RunDir(run, role="lm"), "lm", progress=False)

    # S_1 (training data of finetune 3) recorded in the store as drawn by LLM_0, not LLM_1.
    (run / "manifest.json").write_text(json.dumps(records))
    done = run / "samples" / "iter_0001" / "sampled.done.json"
    info = json.loads(done.read_text())
    done.write_text(json.dumps({**info, "versions": {"lm": 0}}))
    with pytest.raises(VersionError, match="draws from LLM_1, but .* was drawn from LLM_0"):
        run_role(config, RunDir(run, role="lm"), "lm", progress=False)


def test_a_waiting_role_times_out_naming_what_it_waits_for(model_dir, tmp_path):
    config = config_from_dict(
        _config(model_dir, placement="jobs", wait_timeout=0.3, poll_seconds=0.05)
    )
    with pytest.raises(TimeoutError, match=r"train_nado of iteration 1 \(role nado\).*--role nado"):
        run_role(config, RunDir(tmp_path / "run", role="lm"), "lm", progress=False)


def test_role_flag_must_match_the_placement(model_dir, tmp_path, capsys):
    from jaxdetox.cli import main

    jobs = write_config(tmp_path / "jobs.yaml", _config(model_dir, placement="jobs"))
    assert main(["run", str(jobs), "--out", str(tmp_path / "a")]) == 2
    assert "start each role with --role" in capsys.readouterr().err
    colocated = write_config(tmp_path / "colocated.yaml", _config(model_dir))
    assert main(["run", str(colocated), "--out", str(tmp_path / "b"), "--role", "lm"]) == 2
    assert "--role is only for loop.placement=jobs" in capsys.readouterr().err


def test_iteration_walls_from_stage_start_times():
    from jaxdetox.evaluate.runs import iteration_time_markdown, iteration_walls

    def record(iteration, stage, started, seconds):
        return {"iteration": iteration, "stage": stage, "status": "done", "started": started,
                "seconds": seconds}  # fmt: skip

    records = [  # iteration 2 overlaps its three roles; iteration 1 runs them in turn
        record(1, "sample", 0.0, 1.0), record(1, "label", 1.0, 1.0),
        record(1, "train_nado", 2.0, 3.0), record(1, "finetune", 5.0, 4.0),
        record(2, "sample", 10.0, 1.0), record(2, "label", 11.0, 1.0),
        record(2, "train_nado", 10.0, 3.0), record(2, "finetune", 10.0, 4.0),
    ]  # fmt: skip
    walls = iteration_walls(records)
    assert walls[1] == {"start": 0.0, "end": 9.0, "wall": 9.0, "sum": 9.0, "slowest": 4.0}
    assert walls[2] == {"start": 10.0, "end": 14.0, "wall": 4.0, "sum": 9.0, "slowest": 4.0}
    summary = {"method": "pr_parallel", "scheme": "parallel", "placement": "split",
               "walls": walls}  # fmt: skip
    table = iteration_time_markdown([summary])  # iteration 2 ends 5 s after iteration 1
    assert "| pr_parallel | parallel | split | 1 | 5.0 | 9.0 | 4.0 | 1.25 |" in table


def test_a_failed_input_stops_the_waiting_role():
    from jaxdetox.pipeline.flow import InputFailed, check_inputs, producers

    config = config_from_dict(tiny_config(Path("unused"), loop={"scheme": "parallel"}))
    stages = plan_stages(config)
    finetune_2 = next(s for s in stages if (s.iteration, s.name) == (2, "finetune"))
    done = {"status": "done", "outputs": {}}
    records = {
        (1, "label"): {**done, "inputs": {"samples": 0}},
        (1, "train_nado"): {**done, "inputs": {"lm": 0, "nado": 0, "samples": 0}},
    }
    pending = check_inputs(finetune_2, producers(stages), records)
    assert [(s.iteration, s.name) for s in pending] == [(1, "finetune")]  # LLM_1 not made yet
    records[1, "finetune"] = {**done, "inputs": {"lm": 0, "nado": 1, "samples": 0}}
    records[1, "train_nado"] = {
        "status": "failed", "inputs": {"lm": 0, "nado": 0, "samples": 0}, "role": "nado",
        "outputs": {"error": "FloatingPointError: nan loss"},
    }  # fmt: skip
    with pytest.raises(InputFailed, match="train_nado of iteration 1 failed in role nado: Float"):
        check_inputs(finetune_2, producers(stages), records)
    # A stage further down stops too: sample 2 waits for LLM_1, which can never be made.
    del records[1, "finetune"]
    sample_2 = next(s for s in stages if (s.iteration, s.name) == (2, "sample"))
    with pytest.raises(InputFailed, match="needs NADO_1, but train_nado of iteration 1 failed"):
        check_inputs(sample_2, producers(stages), records)
