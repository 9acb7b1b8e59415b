"""Typed run configs: YAML + dotted overrides, errors that name the field, the CLI's
`--dry-run` and its refusal to resume a run with a different config."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxdetox.cli import main
from jaxdetox.commands.session import resolve_run_config
from jaxdetox.config import ConfigError, RunConfig, dump_config, load_config
from tests._tiny_run import save_tiny_model, tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"finetune": {"kl_weight": 0.5}})
    config = load_config(path, ["finetune.alpha=2", "mesh.fsdp=2", "finetune.kl_on=[samples]"])
    assert config.finetune.kl_weight == 0.5 and config.finetune.alpha == 2.0
    assert config.mesh.fsdp == 2 and config.mesh.data == -1
    assert config.train_nado.optimizer.learning_rate == 3e-5  # the authors' lr by default
    # The resolved config round-trips through the YAML the run directory keeps.
    assert RunConfig.model_validate(yaml.safe_load(dump_config(config))) == config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetune.klweight=1"], r"finetune\.klweight: unknown key; valid keys: alpha, "),
        (["finetune.optimizer.lr=1"], r"finetune\.optimizer\.lr: unknown key; valid keys: b1"),
        (["bogus=1"], r"bogus: unknown key; valid keys: baseline, constraints, corpus, eval"),
        (["finetune.kl_weight=abc"], r"finetune\.kl_weight: Input should be a valid number"),
        (["sampling.num_samples=0"], r"sampling\.num_samples: Input should be greater than"),
        (["finetune.reference=latest"], r"finetune\.reference: Input should be 'base' or"),
        (["finetune.kl_on=[corpus]"], r"kl_on includes 'corpus' but no `corpus:` section"),
        (["mesh.data=-1", "mesh.fsdp=-1"], r"at most one -1"),
        (["finetune.kl_weight"], r"expected key=value"),
        (["finetune.kl_weight=1.0.x=2"], r"valid number"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"finetune": {"lambda": 1.0}})
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdetox.cli", "run", str(path), "--out", str(tmp_path / "r")],
        capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "finetune.lambda: unknown key; valid keys:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_plans_without_running(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    path = write_config(tmp_path / "c.yaml", tiny_config(model))
    assert main(["run", str(path), "--dry-run", "mesh.data=4", "mesh.fsdp=2"]) == 0
    out = capsys.readouterr().out
    assert "mesh: {'data': 4, 'fsdp': 2, 'tensor': 1} (8 devices)" in out
    assert "train_nado" in out and "finetune" in out and "LLM params" in out
    assert not (tmp_path / "run").exists()


def test_resuming_with_a_different_config_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(dump_config(load_config(None, ["finetune.kl_weight=0.5"])))
    with pytest.raises(ConfigError, match=r"finetune\.kl_weight: 0\.5 -> 1\.0"):
        resolve_run_config(None, out, ["finetune.kl_weight=1.0"])
    assert resolve_run_config(None, out, []).finetune.kl_weight == 0.5
    with pytest.raises(ConfigError, match="no config.yaml there"):
        resolve_run_config(None, tmp_path / "new", [])


def test_dry_run_of_a_shipped_config_names_what_is_missing_here(capsys):
    # Every shipped config plans (`plan`) or dry-runs: tests/test_experiments.py. The gpt2 /
    # llama2-7b data and weights are not here: `run --dry-run` refuses, naming what is missing.
    gpt2 = REPO / "experiments" / "gpt2" / "small" / "pr_sequential.yaml"
    assert main(["run", str(gpt2), "--dry-run"]) == 2  # no gpt2 in the offline HF cache
    assert "model.path: cannot load: 'gpt2'" in capsys.readouterr().err
    assert main(["run", str(gpt2), "--dry-run", "model.path=default"]) == 2
    assert "prompts.source: data source not found: data/realtoxicityprompts/" in (
        capsys.readouterr().err
    )


def test_remat_policy_by_name_and_the_former_switch():
    policy = lambda *o: (load_config(None, list(o)).model.remat_policy,  # noqa: E731
                         load_config(None, list(o)).model.remat)  # fmt: skip
    assert policy() == ("none", False)
    assert policy("model.remat=true") == ("full", True)  # the on/off key still works
    assert policy("model.remat_policy=dots_saveable") == ("dots_saveable", True)
    assert policy("model.remat=false", "model.remat_policy=none") == ("none", False)
    with pytest.raises(ConfigError, match="set model.remat_policy alone"):
        load_config(None, ["model.remat=false", "model.remat_policy=full"])
    with pytest.raises(ConfigError, match="remat_policy"):
        load_config(None, ["model.remat_policy=dots"])
    config = load_config(None, ["model.remat_policy=dots_saveable", "model.attention=xla"])
    assert RunConfig.model_validate(yaml.safe_load(dump_config(config))) == config  # both keys
