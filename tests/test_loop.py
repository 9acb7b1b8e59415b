"""The sequential loop end to end on a tiny model: manifest flow, exports, exact resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxdetox.commands.session import execute
from jaxdetox.config import config_from_dict
from tests._tiny_run import save_tiny_model, tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]
TIMING = ("step_seconds", "tokens_per_second", "mfu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def finished_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    execute(config_from_dict(tiny_config(model_dir)), out, progress=False)
    return out


def test_manifest_records_the_sequential_data_flow(finished_run):
    records = json.loads((finished_run / "manifest.json").read_text())
    flow = [(r["iteration"], r["stage"], r["inputs"]) for r in records]
    assert flow == [
        (0, "eval", {"lm": 0}),
        (1, "sample", {"lm": 0}),
        (1, "label", {"samples": 1}),
        (1, "train_nado", {"lm": 0, "nado": 0, "samples": 1}),
        (1, "finetune", {"lm": 0, "nado": 1, "samples": 1}),
        (2, "sample", {"lm": 1}),
        (2, "label", {"samples": 2}),
        (2, "train_nado", {"lm": 1, "nado": 1, "samples": 2}),  # S_2 was drawn by LLM_1
        (2, "finetune", {"lm": 1, "nado": 2, "samples": 2}),
        (2, "eval", {"lm": 2}),
    ]
    assert all(r["status"] == "done" and r["seconds"] >= 0 for r in records)
    # 8 prompts x 2 samples per iteration, batch 8, 2 epochs -> 4 steps per stage.
    assert {r["outputs"]["steps"] for r in records if "steps" in r["outputs"]} == {4}


def test_metrics_jsonl_and_tensorboard(finished_run):
    lines = [json.loads(x) for x in (finished_run / "metrics.jsonl").read_text().splitlines()]
    stages = {(r["iteration"], r["stage"]) for r in lines}
    assert stages == {(i, s) for i in (1, 2) for s in ("train_nado", "finetune")}
    nado = [r for r in lines if r["stage"] == "train_nado"]
    assert all(np.isfinite(r["nado/bce"]) and r["nado/tokens"] > 0 for r in nado)
    lm = [r for r in lines if r["stage"] == "finetune"]
    assert all(r["lm/samples/kl"] >= 0 and "lm/grad_norm" in r and "mfu" in r for r in lm)
    assert list((finished_run / "tensorboard").glob("events.out.tfevents.*"))


def test_final_exports_load_in_transformers(finished_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxdetox.models import load_nado, load_pretrained

    model = AutoModelForCausalLM.from_pretrained(finished_run / "final" / "model")
    tok = AutoTokenizer.from_pretrained(finished_run / "final" / "model")
    ids = tok("The quick brown", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    ours = np.asarray(load_pretrained(finished_run / "final" / "model").logits(ids.numpy()))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    nado = load_nado(finished_run / "final" / "nado")
    assert nado.config.body.num_layers == 1


def test_the_fine_tuned_model_differs_from_the_base(finished_run, model_dir):
    base = load_file(model_dir / "model.safetensors")
    final = load_file(finished_run / "final" / "model" / "model.safetensors")
    assert base.keys() == final.keys()
    assert any(not np.array_equal(base[k], final[k]) for k in base)


def test_rerun_resumes_without_recomputing(finished_run, model_dir):
    before = (finished_run / "manifest.json").read_text()
    weights = (finished_run / "final" / "model" / "model.safetensors").read_bytes()
    execute(config_from_dict(tiny_config(model_dir)), finished_run, progress=False)
    assert (finished_run / "manifest.json").read_text() == before  # every stage skipped
    assert (finished_run / "final" / "model" / "model.safetensors").read_bytes() == weights


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "jaxdetox.cli", "run", *args, "--no-progress"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _logged_steps(out: Path, stage: str) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(f'"stage": "{stage}"' in line for line in path.read_text().splitlines())


def _run_until_killed(config: Path, out: Path, stage: str, after_steps: int) -> None:
    proc = _cli(str(config), "--out", str(out), cwd=out.parent)
    deadline = time.time() + 300
    while _logged_steps(out, stage) < after_steps:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "stage never reached"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _final_state(out: Path) -> tuple[dict, dict]:
    weights = load_file(out / "final" / "model" / "model.safetensors")
    nado = load_file(out / "final" / "nado" / "nado.safetensors")
    return weights, nado


def _last_metrics(out: Path) -> dict:
    last = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        last[(r["iteration"], r["stage"])] = {k: v for k, v in r.items() if k not in TIMING}
    return last


@pytest.mark.slow
def test_sigkill_during_training_resumes_to_the_same_result(model_dir, tmp_path):
    # Many short steps, checkpoints every 3: the kills land between, or during, saves (24 NADO
    # steps, killed after 10; 16 LLM steps, killed after 7). No eval: it is not resumed here.
    config = tiny_config(
        model_dir,
        train_nado={"epochs": 6, "batch_size": 4},
        finetune={"epochs": 4, "batch_size": 4},
        loop={"iterations": 1, "checkpoint_every": 3},
        eval={"enabled": False},
    )
    path = write_config(tmp_path / "tiny.yaml", config)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    proc = _cli(str(path), "--out", str(reference), cwd=tmp_path)
    assert proc.wait() == 0, proc.stdout.read()

    _run_until_killed(path, killed, "train_nado", after_steps=10)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert ("train_nado", "running") in {(r["stage"], r["status"]) for r in manifest}
    _run_until_killed(path, killed, "finetune", after_steps=7)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert ("finetune", "running") in {(r["stage"], r["status"]) for r in manifest}
    proc = _cli(str(path), "--out", str(killed), cwd=tmp_path)
    assert proc.wait() == 0, proc.stdout.read()

    (ref_lm, ref_nado), (lm, nado) = _final_state(reference), _final_state(killed)
    for name in ref_lm:
        np.testing.assert_array_equal(lm[name], ref_lm[name], err_msg=name)
    for name in ref_nado:
        np.testing.assert_array_equal(nado[name], ref_nado[name], err_msg=name)
    assert _last_metrics(killed) == _last_metrics(reference)
    resumed = [
        r for r in json.loads((killed / "manifest.json").read_text()) if "steps" in r["outputs"]
    ]
    assert all(r["outputs"]["resumed_from_step"] > 0 for r in resumed)


def test_stage_commands_redo_one_stage_exactly(finished_run, tmp_path, capsys):
    import shutil

    from jaxdetox.cli import main

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    artifact = run / "iter_002" / "finetune"
    before = (artifact / "artifact").exists()
    shutil.rmtree(artifact)
    records = json.loads((run / "manifest.json").read_text())
    kept = [r for r in records if not (r["iteration"] == 2 and r["stage"] == "finetune")]
    (run / "manifest.json").write_text(json.dumps(kept))
    assert before and main(["finetune", str(run), "--iteration", "2", "--no-progress"]) == 0
    redone = json.loads((run / "manifest.json").read_text())
    assert {(r["iteration"], r["stage"], r["status"]) for r in redone} >= {(2, "finetune", "done")}
    assert main(["train-nado", str(run), "--iteration", "3", "--no-progress"]) == 2
    assert "needs label of iteration 3" in capsys.readouterr().err
    # The redone stage restores to the same weights the uninterrupted run exported.
    from jaxdetox.commands.session import resolve_run_config
    from jaxdetox.pipeline.experiment import Experiment
    from jaxdetox.pipeline.rundir import RunDir

    exp = Experiment(resolve_run_config(None, run, []), RunDir(run), progress=False)
    final = load_file(finished_run / "final" / "model" / "model.safetensors")
    exp.context.language_model(exp.artefacts.lm_params(2)).save_pretrained(tmp_path / "redone")
    redone_weights = load_file(tmp_path / "redone" / "model.safetensors")
    for name in final:
        np.testing.assert_array_equal(redone_weights[name], final[name], err_msg=name)


@pytest.mark.slow
def test_parallel_scheme_manifest_shows_the_pipelined_data_flow(model_dir, tmp_path):
    config = tiny_config(
        model_dir,
        loop={"iterations": 4, "scheme": "parallel", "checkpoint_every": 4},
        train_nado={"epochs": 1},
        finetune={"epochs": 1},
        eval={"enabled": False},
    )
    out = tmp_path / "parallel"
    execute(config_from_dict(config), out, progress=False)
    records = json.loads((out / "manifest.json").read_text())
    flow = {(r["iteration"], r["stage"]): r["inputs"] for r in records}
    produced = {r["iteration"]: r["outputs"]["samples"] for r in records if r["stage"] == "sample"}
    # warm-up: sequential on S_0
    assert flow[1, "sample"] == {"lm": 0} and produced[1] == 0
    assert flow[1, "train_nado"] == {"lm": 0, "nado": 0, "samples": 0}
    assert flow[1, "finetune"] == {"lm": 0, "nado": 1, "samples": 0}
    for i in (2, 3, 4):  # no stage consumes an artefact of its own iteration
        assert flow[i, "sample"] == {"lm": i - 1} and produced[i] == i - 1
        assert flow[i, "label"] == {"samples": i - 1}
        assert flow[i, "train_nado"] == {"lm": i - 2, "nado": i - 1, "samples": i - 2}
        assert flow[i, "finetune"] == {"lm": i - 1, "nado": i - 1, "samples": i - 2}
    assert (out / "final" / "model" / "model.safetensors").exists()


def test_train_nado_decomposes_the_llm_that_drew_its_samples(finished_run, tmp_path, monkeypatch):
    """NADO_2 is trained on S_2, drawn by LLM_1: its reference (the Bellman term's p and the
    shared variant's features) is LLM_1, not the base, and its record says so."""
    import shutil

    import jax

    from jaxdetox.commands.session import resolve_run_config
    from jaxdetox.pipeline import train_nado as nado_stage
    from jaxdetox.pipeline import training as training_lib
    from jaxdetox.pipeline.experiment import Experiment
    from jaxdetox.pipeline.rundir import RunDir

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    records = json.loads((run / "manifest.json").read_text())
    kept = [r for r in records if (r["iteration"], r["stage"]) != (2, "train_nado")]
    (run / "manifest.json").write_text(json.dumps(kept))
    shutil.rmtree(run / "iter_002" / "train_nado")
    exp = Experiment(resolve_run_config(None, run, []), RunDir(run), progress=False)
    seen = {}

    def fake_fit(exp, *, training, **kw):  # the stage as set up, without its steps
        seen["ref"] = jax.device_get(training.state.ref_params)
        params = training.state.nado.params
        return training_lib.StageResult(params, kw["total_steps"], {}, 0, 0, state=training.state)

    monkeypatch.setattr(nado_stage, "fit", fake_fit)
    nado_stage.train_nado(exp, 2, nado_version=1, samples=2)  # the store says LLM_1 drew S_2
    record = RunDir(run).record(2, "train_nado")
    assert record["inputs"] == {"lm": 1, "nado": 1, "samples": 2}
    llm_1 = jax.device_get(exp.artefacts.lm_params(1))
    llm_0 = jax.device_get(exp.artefacts.lm_params(0))
    flat = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(flat(seen["ref"]), flat(llm_1)))
    assert not all(np.array_equal(a, b) for a, b in zip(flat(seen["ref"]), flat(llm_0)))
