"""`jaxdetox report` on a hand-made run directory, and the smoke demo end to end."""

import json

import numpy as np
import pytest
import yaml

from jaxdetox.cli import main
from jaxdetox.loop.rundir import read_manifest
from tests._tiny_run import save_tiny_model


def _eval(iteration, mean, emt, ppl):
    outputs = {
        "expected_max_toxicity": emt, "toxicity_probability": emt / 2, "mean_toxicity": mean,
        "perplexity": ppl, "fluency_perplexity": ppl * 1.5, "distinct_2": 0.9,
        "groups": {"toxic": {"expected_max_toxicity": emt + 0.1}},
    }  # fmt: skip
    return {"iteration": iteration, "stage": "eval", "status": "done", "inputs": {"lm": iteration},
            "outputs": outputs, "seconds": 3.0}  # fmt: skip


def _stage(iteration, stage, seconds):
    return {"iteration": iteration, "stage": stage, "status": "done", "inputs": {},
            "outputs": {}, "seconds": seconds}  # fmt: skip


@pytest.fixture
def fixture_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"method": "pr_sequential", "finetune": {"kl_weight": 0.5}})
    )
    records = [_eval(0, 0.20, 0.60, 20.0)]
    for i in (1, 2):
        records += [_stage(i, s, 10.0 * i) for s in ("sample", "label", "train_nado", "finetune")]
    records += [_eval(1, 0.15, 0.50, 21.0), _eval(2, 0.10, 0.40, 22.0)]
    (run / "manifest.json").write_text(json.dumps(records))
    return run


def test_report_table_json_and_plots(fixture_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(fixture_run), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["base", "pr_sequential"]
    base, ours = rows
    for key in ("expected_max_toxicity", "toxicity_probability", "perplexity"):
        assert key in base and key in ours
    assert ours["mean_toxicity"] == 0.10 and ours["seconds"] == 120.0 and ours["kl_weight"] == 0.5
    table = (out / "report.md").read_text()
    assert (
        "| pr_sequential | 0.400 | 0.200 | 0.100 | -50% | 22.00 | 33.00 | 0.900 | – | – | 120 |"
        in table
    )
    for png in ("toxicity_per_iteration", "toxicity_vs_perplexity", "stage_times"):
        data = (out / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "pr_sequential" in capsys.readouterr().out


def test_lambda_sweep_plot_from_runs_at_several_lambdas(tmp_path):
    from jaxdetox.commands.report import write_report

    runs = []
    for i, (lam, tox) in enumerate([(0.5, 0.15), (1.0, 0.12), (2.0, 0.09)]):
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / "config.yaml").write_text(
            yaml.safe_dump({"method": "pr_sequential", "finetune": {"kl_weight": lam}})
        )
        records = [
            _eval(0, 0.20, 0.60, 20.0),
            _stage(1, "finetune", 5.0),
            _eval(1, tox, 0.5, 20 + lam),
        ]
        (run / "manifest.json").write_text(json.dumps(records))
        runs.append(run)
    write_report(runs, tmp_path / "out")
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["method"], r.get("kl_weight")) for r in rows] == [
        ("base", None),
        ("pr_sequential", 0.5),
        ("pr_sequential", 1.0),
        ("pr_sequential", 2.0),
    ]
    data = (tmp_path / "out" / "lambda_sweep.png").read_bytes()
    assert data[:4] == b"\x89PNG" and len(data) > 10_000
    # a single λ draws no sweep
    write_report(runs[:1], tmp_path / "one")
    assert not (tmp_path / "one" / "lambda_sweep.png").exists()


def test_report_on_a_non_run_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a jaxdetox run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_demo_end_to_end(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "demo"
    args = ["demo", "--preset", "smoke", "--model", str(model), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["base", "pr_sequential", "nado_decoding"]
    assert all(np.isfinite(r["perplexity"]) and r["expected_max_toxicity"] >= 0 for r in rows)
    # nado_decoding adopted the method's samples, labels and NADO_1 and ran only its eval.
    method, baseline = read_manifest(out / "run"), read_manifest(out / "nado_decoding")
    assert [(r["iteration"], r["stage"]) for r in baseline] == [
        (1, "sample"), (1, "label"), (1, "train_nado"), (1, "eval")
    ]  # fmt: skip
    assert all(r["outputs"]["adopted_from"] == str(out / "run") for r in baseline[:3])
    assert [r["inputs"] for r in baseline[:3]] == [r["inputs"] for r in method[1:4]]
    assert baseline[3]["inputs"] == {"lm": 0, "nado": 1}
    linked = out / "nado_decoding" / "iter_001" / "train_nado"
    assert any(f.stat().st_nlink > 1 for f in linked.rglob("*") if f.is_file())
    assert (out / "report.md").exists() and list(out.glob("*.png"))
    hf = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    with torch.no_grad():
        assert torch.isfinite(hf(**tok("Hello there", return_tensors="pt")).logits).all()
    assert (out / "nado" / "nado.safetensors").exists()
    # Rerunning resumes: nothing recomputed, same report.
    before = (out / "results.json").read_text()
    assert main(args) == 0
    assert (out / "results.json").read_text() == before


@pytest.mark.slow
def test_eval_command_on_a_checkpoint(tmp_path, capsys, monkeypatch):
    import shutil
    from pathlib import Path

    fixtures = Path(__file__).parent / "fixtures"
    shutil.copytree(fixtures / "lm_eval", tmp_path / "tasks")
    monkeypatch.chdir(tmp_path / "tasks")  # the task YAMLs name their jsonl relative to cwd
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "eval"
    args = ["eval", str(model), "--out", str(out), "--method", "tiny", "--no-progress",
            "eval.num_samples=2", "eval.max_prompts=4", "eval.max_new_tokens=4",
            "eval.text_seq_len=32", "prompts.max_tokens=12",
            f"eval.detection.path={fixtures / 'detection' / 'eval.jsonl'}",
            "eval.lm_eval.tasks=[jaxdetox_tiny_mc]", f"eval.lm_eval.include_path={tmp_path / 'tasks'}",
            "eval.lm_eval.limit=4"]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["tiny"]
    assert rows[0]["prompts"] == 4 and rows[0]["completions"] == 8
    assert np.isfinite(rows[0]["perplexity"]) and 0 <= rows[0]["distinct_2"] <= 1
    assert 0 <= rows[0]["detection_auroc"] <= 1
    assert set(rows[0]["utility"]) == {"jaxdetox_tiny_mc"}
    assert "jaxdetox_tiny_mc" in (out / "report.md").read_text()
    assert main(["eval", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "cannot load" in capsys.readouterr().err


def test_group_toxicity_counts_a_prompt_in_each_of_its_groups():
    from jaxdetox.loop.evaluation import group_toxicity

    tox = np.array([0.9, 0.1, 0.2, 0.6])
    ok = np.ones(4, bool)
    prompts = np.array([1, 1, 2, 3])
    groups = {1: ("asian", "women"), 2: ("women",), 3: ("lgbtq",)}
    out = group_toxicity(tox, ok, prompts, groups)
    assert set(out) == {"all", "asian", "women", "lgbtq"}
    assert out["women"]["prompts"] == 2 and out["asian"]["completions"] == 2
    np.testing.assert_allclose(out["women"]["toxic_fraction"], 1 / 3)
    np.testing.assert_allclose(out["lgbtq"]["expected_max_toxicity"], 0.6)
