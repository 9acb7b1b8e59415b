"""Held-out NADO quality (`evaluate.nado_quality`): the figures on fixtures with known answers,
the held-out split, and their place in a run's records and report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxdetox.evaluate.nado_quality import (
    auroc,
    expected_calibration_error,
    heldout_split,
    nado_quality,
    weighted_bce,
)


def _fixture(seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.random(12)
    weight = (rng.random((12, 6)) > 0.3).astype(float)
    weight[:, 0] = 1.0  # every row has a labelled position
    return labels, weight


def test_a_nado_predicting_the_label_mean_scores_exactly_the_constant_bce():
    labels, weight = _fixture()
    mean = 0.7
    logit = np.full(weight.shape, np.log(mean / (1 - mean)))
    q = nado_quality(logit, labels, weight, mean, np.zeros(5, bool))
    assert q.heldout_bce == q.constant_bce
    assert not q.beats_constant
    assert q.vocab_coverage == 0.0
    assert q.heldout_samples == 12


def test_a_nado_that_knows_the_labels_beats_the_constant():
    labels, weight = _fixture(1)
    logit = np.broadcast_to(np.log(labels / (1 - labels))[:, None], weight.shape)
    q = nado_quality(logit, labels, weight, float(labels.mean()), np.array([True, False]))
    assert q.beats_constant and q.heldout_bce < q.constant_bce
    assert q.auroc == 1.0  # R at the last token orders the labels exactly
    assert q.ece == pytest.approx(0.0, abs=1e-12)  # and is calibrated
    assert q.vocab_coverage == 0.5
    assert q.to_json()["beats_constant"] is True


def test_bce_auroc_ece_by_hand():
    # BCE-with-logits of logit 0 is log 2 whatever the label.
    assert weighted_bce(np.zeros(3), np.array([0.0, 1.0, 0.3]), np.ones(3)) == pytest.approx(
        np.log(2)
    )
    # Weights select: only the second entry counts.
    got = weighted_bce(np.array([5.0, -2.0]), np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    assert got == pytest.approx(np.log1p(np.exp(2.0)))
    # AUROC: one inversion among 2 x 2 pairs; ties count half; one class -> None.
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == 0.75
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1], bool)) == 0.5
    assert auroc(np.array([0.2, 0.3]), np.array([1, 1], bool)) is None
    # ECE: 2 bins: |0.15 - 0| and |0.85 - 0.5| with half the mass each; 10 bins: each its own.
    prob, label = np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 0.0])
    assert expected_calibration_error(prob, label, bins=2) == pytest.approx(0.25)
    assert expected_calibration_error(prob, label) == pytest.approx((0.1 + 0.2 + 0.2 + 0.9) / 4)


def test_heldout_split_holds_out_whole_prompts():
    prompt_ids = np.repeat(np.arange(20), 4)
    train, held = heldout_split(prompt_ids, 0.1, seed=3)
    assert len(set(prompt_ids[held])) == 2 and len(held) == 8
    assert not set(prompt_ids[train]) & set(prompt_ids[held])
    assert sorted(np.concatenate([train, held])) == list(range(80))
    again = heldout_split(prompt_ids, 0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, held)))
    assert len(heldout_split(prompt_ids, 0.0)[1]) == 0
    assert len(heldout_split(np.zeros(4, int), 0.5)[1]) == 0  # one prompt: nothing to hold out
    assert len(heldout_split(np.arange(3), 0.01)[1]) == 1  # a positive fraction holds one out


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["separate", "shared"])
def test_train_nado_records_its_quality_and_the_report_shows_it(tmp_path, variant):
    from jaxdetox.commands.report import write_report
    from jaxdetox.commands.session import execute
    from jaxdetox.config import config_from_dict
    from tests._tiny_run import save_tiny_model, tiny_config

    model = save_tiny_model(tmp_path / "model")
    config = tiny_config(
        model, loop={"iterations": 1}, eval={"enabled": False},
        nado={"head": "factored", "bias_init": "label_mean", "variant": variant},
        train_nado={"epochs": 4, "early_stopping": True, "heldout_fraction": 0.25},
    )  # fmt: skip
    out = tmp_path / "run"
    execute(config_from_dict(config), out, progress=False)
    records = json.loads((out / "manifest.json").read_text())
    (record,) = [r for r in records if r["stage"] == "train_nado"]
    quality = record["outputs"]["nado_quality"]
    for key in ("heldout_bce", "constant_bce", "auroc", "ece", "vocab_coverage"):
        assert key in quality
    assert quality["heldout_samples"] == 4  # 2 of the block's 8 prompts x 2 samples
    assert quality["vocab_coverage"] == 1.0  # the factored head moves every row
    validation = record["outputs"]["validation"]
    assert validation["best_step"] is not None and validation["best"] > 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("nado/heldout_bce" in m for m in metrics if m["stage"] == "train_nado")
    write_report([out], tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## NADO quality (held-out samples)" in report
    assert f"{quality['heldout_bce']:.4f}" in report


def test_bce_gain_stderr_is_the_standard_error_over_prompts():
    """With one row per prompt and equal weights the ratio estimator's error is the plain
    standard error of the per-prompt gains; with fewer than two prompts there is none."""
    from jaxdetox.evaluate.nado_quality import bce_gain_stderr

    rng = np.random.default_rng(3)
    gain = rng.normal(size=(7, 5))
    weight = np.ones((7, 5))
    per_prompt = gain.mean(axis=1)
    expected = per_prompt.std(ddof=1) / np.sqrt(7)
    assert bce_gain_stderr(gain, weight, np.arange(7)) == pytest.approx(expected, rel=1e-12)
    # Rows of one prompt are one unit: splitting a prompt's rows does not change the error.
    doubled = np.repeat(gain, 2, axis=0)
    assert bce_gain_stderr(doubled, np.ones((14, 5)), np.repeat(np.arange(7), 2)) == (
        pytest.approx(expected / 1.0, rel=1e-12)
    )
    assert bce_gain_stderr(gain, weight, np.zeros(7)) is None


def test_clearly_beats_constant_needs_a_gain_beyond_two_standard_errors():
    labels, weight = _fixture(1)
    groups = np.arange(12) // 3  # 4 prompts of 3 samples
    exact = np.broadcast_to(np.log(labels / (1 - labels))[:, None], weight.shape)
    q = nado_quality(exact, labels, weight, float(labels.mean()), np.zeros(2, bool), groups)
    assert q.bce_gain == pytest.approx(q.constant_bce - q.heldout_bce)
    assert q.bce_gain_stderr is not None and q.clearly_beats_constant
    record = q.to_json()
    assert record["clearly_beats_constant"] is True and "bce_gain_stderr" in record
    mean = 0.7
    const = np.full(weight.shape, np.log(mean / (1 - mean)))
    q = nado_quality(const, labels, weight, mean, np.zeros(2, bool), groups)
    assert q.bce_gain == 0.0 and q.clearly_beats_constant is False
    q = nado_quality(const, labels, weight, mean, np.zeros(2, bool))
    assert q.bce_gain_stderr is None and q.clearly_beats_constant is None


def test_report_table_shows_the_gain_with_its_error_and_flags():
    from jaxdetox.evaluate.runs import nado_quality_markdown

    common = {"constraint": None, "auroc": None, "ece": 0.1, "vocab_coverage": 1.0}
    table = nado_quality_markdown([{"method": "pr_sequential", "nado_quality": [
        {**common, "iteration": 1, "heldout_bce": 0.50, "constant_bce": 0.52, "bce_gain": 0.02,
         "bce_gain_stderr": 0.005, "clearly_beats_constant": True, "beats_constant": True},
        {**common, "iteration": 2, "heldout_bce": 0.50, "constant_bce": 0.49, "bce_gain": -0.01,
         "bce_gain_stderr": 0.02, "clearly_beats_constant": False, "beats_constant": False},
    ]}])  # fmt: skip
    rows = [line for line in table.splitlines() if line.startswith("| pr_sequential")]
    assert "| 0.0200 ± 0.0050 * |" in rows[0] and "⚠" not in rows[0]
    assert "| 0.5000 ⚠ |" in rows[1] and "| -0.0100 ± 0.0200 |" in rows[1]
    # Two runs of one method are told apart by their run directory's name.
    runs = [{"method": "pr_sequential", "run": f"runs/{d}", "nado_quality": [
        {**common, "iteration": 1, "heldout_bce": 0.5, "constant_bce": 0.5, "bce_gain": 0.0}]}
        for d in ("a", "b")]  # fmt: skip
    table = nado_quality_markdown(runs)
    assert "| pr_sequential [a] | 1 |" in table and "| pr_sequential [b] | 1 |" in table
