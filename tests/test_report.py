"""`jaxdetox report` on a hand-made run directory, and the smoke demo end to end."""

import json

import numpy as np
import pytest
import yaml

from jaxdetox.cli import main
from jaxdetox.pipeline.rundir import read_manifest
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
    # a run evaluated before standard errors and per-prompt results were kept: values alone,
    # Δ without its error and a note saying why; no detection / utility columns (not asked for)
    assert (
        "| method | exp. max toxicity | toxicity prob. | mean toxicity | Δ mean tox. vs base "
        "| PPL (held-out) | PPL (generations) | distinct-2 | train time (s) | samples "
        "| oracle calls |" in table
    )
    assert (
        "| pr_sequential | 0.400 | 0.200 | 0.100 | -50% (1) | 22.00 | 33.00 | 0.900 | 120 |"
        in table
    )
    assert "- (1) no per-prompt results (evaluated before they were kept)" in table
    assert "- No standard errors for base, pr_sequential: evaluated before" in table
    assert "mean_toxicity_stderr" not in ours and ours["delta_note"].startswith("no per-prompt")
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
    # the eval stage records each toxicity figure's standard error and keeps per-prompt results
    record = next(r for r in read_manifest(out) if r["stage"] == "eval")["outputs"]
    for key in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity"):
        assert rows[0][f"{key}_stderr"] == record[f"{key}_stderr"] and record[f"{key}_stderr"] >= 0
    assert all("mean_toxicity_stderr" in g for g in record["groups"].values())  # per group
    per_prompt = json.loads((out / "eval" / "lm_000.prompts.json").read_text())
    assert len(per_prompt["prompt_id"]) == 4 and sum(per_prompt["scored"]) == 8
    np.testing.assert_allclose(np.mean(per_prompt["mean_toxicity"]), record["mean_toxicity"])
    assert "± " in (out / "report.md").read_text()
    assert set(rows[0]["utility"]) == {"jaxdetox_tiny_mc"}
    assert "jaxdetox_tiny_mc" in (out / "report.md").read_text()
    assert main(["eval", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "cannot load" in capsys.readouterr().err


def test_group_toxicity_counts_a_prompt_in_each_of_its_groups():
    from jaxdetox.pipeline.evaluation import group_toxicity

    tox = np.array([0.9, 0.1, 0.2, 0.6])
    ok = np.ones(4, bool)
    prompts = np.array([1, 1, 2, 3])
    groups = {1: ("asian", "women"), 2: ("women",), 3: ("lgbtq",)}
    out = group_toxicity(tox, ok, prompts, groups)
    assert set(out) == {"all", "asian", "women", "lgbtq"}
    assert out["women"]["prompts"] == 2 and out["asian"]["completions"] == 2
    np.testing.assert_allclose(out["women"]["toxic_fraction"], 1 / 3)
    np.testing.assert_allclose(out["lgbtq"]["expected_max_toxicity"], 0.6)


# Per prompt (rows) × completions: base means 0.3 0.7 0.1 0.5, the fine-tuned LM's 0.2 0.5 0.0 0.4.
BASE_TOX = np.array([[0.2, 0.4], [0.6, 0.8], [0.0, 0.2], [0.4, 0.6]])
TUNED_TOX = np.array([[0.1, 0.3], [0.5, 0.5], [0.0, 0.0], [0.3, 0.5]])


def _measured_eval(run, iteration, tox, texts=("a", "b", "c", "d"), **extra):
    """An eval record as the eval stage makes it (toxicity_summary of known per-prompt
    scores), with its per-prompt results file."""
    from jaxdetox.evaluate import toxicity_summary
    from jaxdetox.evaluate.report import PER_PROMPT_FILE, write_per_prompt

    prompts, k = tox.shape
    ids, flat, ok = np.repeat(np.arange(prompts), k), tox.reshape(-1), np.ones(tox.size, bool)
    outputs = {**toxicity_summary(flat, ok, ids), "perplexity": 20.0, **extra}
    (run / "eval").mkdir(parents=True, exist_ok=True)
    write_per_prompt(run / "eval" / PER_PROMPT_FILE.format(iteration), flat, ok, ids,
                     [texts[i] for i in ids])  # fmt: skip
    return {"iteration": iteration, "stage": "eval", "status": "done",
            "inputs": {"lm": iteration}, "outputs": outputs, "seconds": 3.0}  # fmt: skip


def _write_run(run, method, records):
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": method}))
    (run / "manifest.json").write_text(json.dumps(records))
    return run


def test_standard_errors_and_the_paired_difference_from_base(tmp_path):
    from jaxdetox.commands.report import write_report

    run = _write_run(tmp_path / "run", "pr_sequential", [
        _measured_eval(tmp_path / "run", 0, BASE_TOX), _stage(1, "finetune", 5.0),
        _measured_eval(tmp_path / "run", 1, TUNED_TOX),
    ])  # fmt: skip
    write_report([run], tmp_path / "out")
    base, tuned = json.loads((tmp_path / "out" / "results.json").read_text())
    se = lambda v: np.std(v, ddof=1) / np.sqrt(len(v))  # noqa: E731
    np.testing.assert_allclose(base["mean_toxicity_stderr"], se([0.3, 0.7, 0.1, 0.5]))
    np.testing.assert_allclose(base["expected_max_toxicity_stderr"], se([0.4, 0.8, 0.2, 0.6]))
    np.testing.assert_allclose(base["toxicity_probability_stderr"], se([0, 1, 0, 1]))
    np.testing.assert_allclose(tuned["mean_toxicity_stderr"], se([0.2, 0.5, 0.0, 0.4]))
    d = [-0.1, -0.2, -0.1, -0.1]
    np.testing.assert_allclose(tuned["delta_mean_toxicity"], np.mean(d))
    np.testing.assert_allclose(tuned["delta_mean_toxicity_stderr"], se(d))
    assert tuned["paired_prompts"] == 4 and "delta_note" not in tuned
    assert "delta_mean_toxicity" not in base  # the base is the reference
    for key in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity", "perplexity"):
        assert key in base and key in tuned  # the public keys are kept
    table = (tmp_path / "out" / "report.md").read_text()
    # 0.275 vs 0.400: −31 %, paired SE 0.025 = 6 % of base, |Δ| = 0.125 > 2 SE
    tuned_max = [0.3, 0.5, 0.0, 0.5]  # two of four >= 0.5
    emt = f"{np.mean(tuned_max):.3f} ± {se(tuned_max):.3f}"
    mean = f"0.275 ± {se([0.2, 0.5, 0.0, 0.4]):.3f}"
    assert f"| pr_sequential | {emt} | 0.500 ± 0.289 | {mean} | -31% ± 6% * |" in table
    emt = f"0.500 ± {se([0.4, 0.8, 0.2, 0.6]):.3f}"
    assert f"| base | {emt} | 0.500 ± 0.289 | 0.400 ± 0.129 | – |" in table
    assert "`*`: the difference exceeds two of them" in table
    assert "PPL (generations)" not in table and "detection AUROC" not in table  # not measured


def test_delta_says_why_it_is_empty(tmp_path):
    from jaxdetox.evaluate.runs import collect, results_markdown

    base = _write_run(tmp_path / "base", "base", [_measured_eval(tmp_path / "base", 0, BASE_TOX)])
    other = _write_run(tmp_path / "other", "dpo", [
        _stage(1, "finetune", 5.0),
        _measured_eval(tmp_path / "other", 1, TUNED_TOX, texts=("e", "f", "g", "h")),
    ])  # fmt: skip
    same = _write_run(tmp_path / "same", "reinforce", [
        _stage(1, "finetune", 5.0), _measured_eval(tmp_path / "same", 1, TUNED_TOX),
    ])  # fmt: skip
    rows, _ = collect([base, other, same])
    other_prompts = "evaluated on other prompts than the base row"
    assert [r.get("delta_note") for r in rows] == [None, other_prompts, None]
    table = results_markdown(rows)
    dpo = next(line for line in table.splitlines() if line.startswith("| dpo |"))
    assert dpo.split(" | ")[4] == "– (1)"  # the Δ cell: empty, and why
    assert "- (1) evaluated on other prompts than the base row." in table
    assert "-31% ± 6% *" in table.split("| reinforce |")[1]  # another run, same prompts: paired
    # no base among the runs: every Δ says so
    rows, _ = collect([other])
    assert rows[0]["delta_note"] == "no base row among the reported runs"
    assert "| – (1) |" in results_markdown(rows)
    assert "- (1) no base row among the reported runs." in results_markdown(rows)


def test_detection_and_utility_columns_only_when_measured(tmp_path):
    from jaxdetox.evaluate.runs import collect, results_markdown

    plain = _write_run(
        tmp_path / "plain", "base", [_measured_eval(tmp_path / "plain", 0, BASE_TOX)]
    )
    header = results_markdown(collect([plain])[0]).splitlines()[0]
    assert "detection AUROC" not in header and "utility" not in header
    assert "PPL (generations)" not in header and "distinct-2" not in header
    tuned = _write_run(tmp_path / "tuned", "dpo", [
        _stage(1, "finetune", 5.0),
        _measured_eval(tmp_path / "tuned", 1, TUNED_TOX, detection_auroc=0.75,
                       utility={"arc": 0.5}),
    ])  # fmt: skip
    lines = results_markdown(collect([plain, tuned])[0]).splitlines()
    cols = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cols.index("detection AUROC") == cols.index("PPL (held-out)") + 1
    assert cols[cols.index("detection AUROC") + 1] == "utility"
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[0] == "dpo" and cells[cols.index("detection AUROC")] == "0.750"
    assert cells[cols.index("utility")] == "arc 0.500"
    base_cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert base_cells[cols.index("detection AUROC")] == "–"  # asked for on one row only


@pytest.mark.parametrize("iterations", [[0], [0, 1], [0, 2, 4], list(range(15))])
def test_plots_have_integer_iteration_ticks_and_legends_beside_the_data(
    iterations, tmp_path, monkeypatch
):
    from jaxdetox.evaluate import plots

    figures = {}

    def keep(fig, path):
        fig.tight_layout()
        fig.canvas.draw()
        figures[path.stem] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    curve = [{"iteration": i, "mean_toxicity": 0.2 - 0.01 * i, "mean_toxicity_stderr": 0.01,
              "expected_max_toxicity": 0.5, "expected_max_toxicity_stderr": None}
             for i in iterations]  # fmt: skip
    times = {i: {"sample": 3.0, "label": 1.0, "train_nado": 2.0, "finetune": 9.0}
             for i in iterations if i}  # fmt: skip
    walls = {i: {"wall": 12.0, "sum": 15.0, "slowest": 9.0} for i in times}
    summaries = [{"method": "pr_sequential", "placement": "colocated", "curve": curve,
                  "times": times, "walls": walls,
                  "rows": [{"method": "pr_sequential", "kl_weight": lam}]}
                 for lam in (0.5, 2.0)]  # fmt: skip
    rows = [{"method": "pr_sequential", "kl_weight": lam, "perplexity": 20 + lam,
             "mean_toxicity": 0.1, "mean_toxicity_stderr": 0.01} for lam in (0.5, 2.0)]  # fmt: skip
    plots.toxicity_per_iteration(summaries, tmp_path)
    plots.toxicity_vs_perplexity(rows, tmp_path)
    plots.lambda_sweep(rows, tmp_path)
    if times:
        plots.stage_times(summaries, tmp_path)
        plots.iteration_times(summaries, tmp_path)
    for ax in figures["toxicity_per_iteration"].axes:
        ticks = ax.get_xticks()
        lo, hi = ax.get_xlim()
        shown = [t for t in ticks if lo <= t <= hi]
        assert shown and all(float(t).is_integer() for t in shown)
        assert {int(t) for t in shown} >= ({*iterations} if len(iterations) <= 12 else {0})
    for name, fig in figures.items():
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert len(legends) == 1, name
        box = legends[0].get_window_extent()
        width, _ = fig.canvas.get_width_height()
        assert box.x1 <= width + 1, f"{name}: legend cut off"
        for ax in fig.axes:  # beside every axes, over none of them
            assert not box.overlaps(ax.get_window_extent()), name


def test_row_names_tell_apart_runs_of_one_method_and_lambda():
    """Rows of one method are named by λ; where λ is shared too, by their run directory."""
    from jaxdetox.evaluate.runs import row_names

    rows = [
        {"method": "base", "kl_weight": None, "run": "runs/x/base"},
        {"method": "pr_sequential", "kl_weight": 1.0, "run": "runs/x/ref_base"},
        {"method": "pr_sequential", "kl_weight": 1.0, "run": "gs://b/x/ref_previous"},
        {"method": "lambda_sweep", "kl_weight": 0.3, "run": "runs/x/sweep/l0.3"},
        {"method": "lambda_sweep", "kl_weight": 3.0, "run": "runs/x/sweep/l3"},
    ]
    assert row_names(rows) == [
        "base",
        "pr_sequential (λ=1) [ref_base]",
        "pr_sequential (λ=1) [ref_previous]",
        "lambda_sweep (λ=0.3)",
        "lambda_sweep (λ=3)",
    ]
