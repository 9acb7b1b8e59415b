"""Every shipped config validates and plans (`jaxdetox plan CONFIG`), offline; the tiny
ones, whose data and model are on every machine, pass `jaxdetox run CONFIG --dry-run` (the
check that a run could start here); `jaxdetox experiment DIR` runs a folder, skips what
finished and reports it as one table."""

import json
from pathlib import Path

import pytest
import yaml

from jaxdetox.cli import main
from tests._tiny_run import save_tiny_model, tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "experiments").rglob("*.yaml"))


def test_every_method_has_a_tiny_config():
    from jaxdetox.methods import names

    assert CONFIGS, "no experiment configs found"
    methods = {yaml.safe_load(p.read_text()).get("method", "pr_sequential") for p in CONFIGS
               if p.parent.name == "tiny"}  # fmt: skip
    assert methods == set(names())  # every method of the registry, and only those


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_config_plans(path, capsys):
    tiny = path.parent.name == "tiny"
    command = ["run", str(path), "--dry-run"] if tiny else ["plan", str(path)]
    assert main(command) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    method = yaml.safe_load(path.read_text()).get("method", "pr_sequential")
    assert f"method {method}" in out and "memory per device" in out
    if tiny:
        assert "checked (a run would start):" in out
    assert f"run '{yaml.safe_load(path.read_text())['name']}'" in out


@pytest.mark.slow
def test_experiment_runs_a_folder_then_skips_it(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    folder = tmp_path / "exp"
    folder.mkdir()
    short = {"loop": {"iterations": 1, "checkpoint_every": 2}, "finetune": {"max_steps": 2}}
    write_config(folder / "base.yaml", {**tiny_config(model, **short), "method": "base"})
    sft = tiny_config(
        model, **short, corpus={"source": "builtin", "seq_len": 32, "batch_size": 4},
        eval={"base": False},
    )  # fmt: skip
    write_config(folder / "sft_only.yaml", {**sft, "method": "sft_only"})
    out = tmp_path / "runs"
    args = ["experiment", str(folder), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["base", "sft_only"]
    assert (out / "report.md").exists() and (out / "toxicity_vs_perplexity.png").exists()
    capsys.readouterr()
    assert main(args) == 0  # finished runs are skipped, the report is written again
    printed = capsys.readouterr().out
    assert printed.count("finished earlier") == 2
