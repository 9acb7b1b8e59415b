"""`python -m benchmarks.device --dry-run`: the accelerator script's code at toy shapes on
CPU, and the schema of the JSON it writes (no timing assertions)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import device

ROOT = Path(__file__).parents[1]


def _figures(tree, path=()):
    """Every `(path, dict)` carrying a `status` (a figure or a section)."""
    if isinstance(tree, dict):
        if "status" in tree:
            yield path, tree
        for key, value in tree.items():
            yield from _figures(value, (*path, key))


def _numbers(tree):
    if isinstance(tree, bool):
        return
    if isinstance(tree, int | float):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _numbers(value)


def _reject_constant(name):
    raise ValueError(f"non-finite number {name} in the JSON")


@pytest.mark.slow
def test_dry_run_writes_the_schema(tmp_path):
    out = tmp_path / "device.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a one-GPU machine
    subprocess.run(
        [sys.executable, "-m", "benchmarks.device", "--dry-run", "--out", str(out)],
        cwd=ROOT, env=env, check=True, timeout=1200,
    )  # fmt: skip
    report = json.loads(out.read_text(), parse_constant=_reject_constant)

    assert report["schema_version"] == device.SCHEMA_VERSION and report["dry_run"] is True
    assert set(report["sections"]) == set(device.SECTIONS)
    assert set(report["targets"]) == set(device.TARGETS)
    assert report["machine"]["backend"] == "cpu"
    assert all(math.isfinite(x) for x in _numbers(report))

    figures = dict(_figures(report["sections"]))
    for path, fig in figures.items():
        assert fig["status"] in device.STATUSES, path
        assert (fig["reason"] is None) == (fig["status"] == "measured"), path
        assert fig["status"] != "failed", (path, fig["reason"])  # every code path runs
        assert fig["wall_s"] >= 0, path
    # What a CPU cannot measure says why; everything else is measured.
    cudnn = figures[("attention", "cudnn_vs_einsum")]
    assert cudnn["status"] == "skipped" and "cuDNN" in cudnn["reason"]
    skipped = [p for p, f in figures.items() if f["status"] == "skipped"]
    assert skipped == [("attention", "cudnn_vs_einsum")]

    s = report["sections"]
    assert s["attention"]["auto_selects"] == "einsum"
    assert s["attention"]["xla_vs_einsum"]["max_abs_diff_real_rows"] < 0.05  # bf16 rounding
    for step in ("lm_step", "nado_step", "joint_step"):
        assert s["mfu"][step]["mfu"] > 0 and s["mfu"][step]["model_flops"] > 0
    for case in ("llama_1b_full", "llama_2_7b_lora"):
        for stage in ("sample", "train_nado", "finetune", "eval"):
            fig = s["memory"][case][stage]
            assert fig["xla_bytes"] > 0 and fig["planned_bytes"] > 0
            ratio = fig["planned_bytes"] / fig["xla_bytes"]
            assert fig["plan_over_xla"] == pytest.approx(ratio, abs=1e-4)  # rounded
    assert s["memory"]["llama_2_7b_lora"]["lora"] is True
    assert s["sampler"]["rtp"]["tokens_per_s"]["ours"] > 0
    assert s["sampler"]["nado_guided"]["guided_over_plain"] > 0
    summary = report["summary"]
    assert summary["cudnn_max_abs_diff"] is None  # not measured: no GPU
    assert summary["joint_step_mfu"] == s["mfu"]["joint_step"]["mfu"]


def test_unknown_section_is_an_error(capsys):
    with pytest.raises(SystemExit):
        device.main(["--dry-run", "--only", "sampler,flash"])
    assert "unknown section" in capsys.readouterr().err
