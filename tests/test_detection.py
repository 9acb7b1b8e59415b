"""Toxicity detection with the LM as a classifier (`jaxdetox.evaluate.detection`): metrics
against hand-computed answers (and scikit-learn), prompts and shots, and a run on a tiny
model over a 10-row fixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jaxdetox.evaluate.detection import (
    DetectionConfig,
    LabelledTexts,
    auroc,
    best_f1_threshold,
    binary_metrics,
    detection_metrics,
    evaluate_detection,
    few_shot_prefix,
    load_labelled,
)
from tests._tiny import tiny_llama

FIXTURES = Path(__file__).parent / "fixtures" / "detection"

# log-odds and labels with hand-computed metrics (see each test).
SCORES = [-1.0, 2.0, 0.5, -0.2, 3.0, -3.0]
LABELS = [0, 1, 0, 1, 1, 0]


def test_auroc_hand_computed_with_ties():
    # Positives 0.4, 0.8; negatives 0.1, 0.4, 0.3. Pairs won: 0.4 beats 0.1 and 0.3 and ties
    # 0.4 (one half); 0.8 beats all three: (2 + 0.5 + 3) / 6.
    assert auroc([0.1, 0.4, 0.4, 0.8, 0.3], [0, 1, 0, 1, 0]) == pytest.approx(5.5 / 6)
    # 2.0 and 3.0 beat all three negatives, -0.2 beats -1 and -3: 8 / 9.
    assert auroc(SCORES, LABELS) == pytest.approx(8 / 9)
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.5)  # all tied
    assert auroc([0.0, 1.0], [1, 0]) == 0.0
    assert np.isnan(auroc([0.3, 0.4], [1, 1]))


def test_auroc_equals_sklearn_on_random_tied_scores():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 2, 50)
        scores = rng.integers(0, 6, 50).astype(float)  # many ties
        assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_threshold_zero_metrics_hand_computed():
    # score >= 0 predicts toxic: [0, 1, 1, 0, 1, 0] -> TP 2 (rows 1, 4), FP 1 (row 2),
    # FN 1 (row 3), TN 2: accuracy 4/6, precision 2/3, recall 2/3, F1 2/3.
    m = detection_metrics(SCORES, LABELS)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["auroc"] == pytest.approx(8 / 9)
    assert (m["n"], m["positives"], m["threshold"]) == (6, 3, 0.0)
    # Thresholds from the top: 3.0 -> F1 2/4, 2.0 -> 4/5, 0.5 -> 4/6, -0.2 -> 6/7 (TP 3,
    # FP 1), -1.0 -> 6/8, -3.0 -> 6/9: the best is -0.2 with 6/7.
    assert best_f1_threshold(SCORES, LABELS) == pytest.approx((-0.2, 6 / 7))
    assert m["best_f1"] == pytest.approx(6 / 7)
    assert m["best_f1_threshold"] == pytest.approx(-0.2)


def test_binary_metrics_edge_cases_and_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    assert binary_metrics([0, 0], [0, 0]) == {
        "accuracy": 1.0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
    }
    rng = np.random.default_rng(1)
    for _ in range(10):
        y, p = rng.integers(0, 2, 30), rng.integers(0, 2, 30)
        m = binary_metrics(p, y)
        assert m["f1"] == pytest.approx(f1_score(y, p, zero_division=0.0))
        assert m["accuracy"] == pytest.approx(accuracy_score(y, p))


def test_load_labelled_fields_and_threshold():
    rows = load_labelled(FIXTURES / "eval.jsonl")
    assert len(rows.texts) == 10 and rows.labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 0]
    shots = load_labelled(FIXTURES / "shots.jsonl", label_field="toxicity", limit=4)
    assert shots.labels.tolist() == [0, 1, 0, 1]  # civil_comments style: toxicity >= 0.5
    with pytest.raises(KeyError, match="toxicity"):
        load_labelled(FIXTURES / "eval.jsonl", label_field="toxicity")


def test_few_shot_prefix_is_deterministic_and_balanced():
    shots = load_labelled(FIXTURES / "shots.jsonl", label_field="toxicity")
    config = DetectionConfig(num_shots=2, shot_seed=7)
    prefix = few_shot_prefix(shots, config)
    assert prefix == few_shot_prefix(shots, config)
    examples = prefix.split("\n\n")[:-1]
    assert len(examples) == 2 and prefix.endswith("\n\n")
    assert sorted(e.rsplit(":", 1)[1] for e in examples) == [" No", " Yes"]
    for e in examples:
        assert e.startswith("Is the following text toxic?\nText: ")
    assert few_shot_prefix(shots, config, num_shots=0) == ""
    assert len(few_shot_prefix(shots, DetectionConfig(num_shots=5)).split("\n\n")) == 6
    with pytest.raises(ValueError, match="6 shots"):
        few_shot_prefix(shots, DetectionConfig(num_shots=6))
    with pytest.raises(ValueError, match="text"):
        DetectionConfig(template="Toxic? Answer:")


def _answer_logprob(lm, context: str, answer: str) -> float:
    """log p(answer | context) from the model's full logits on context + answer."""
    tok = lm.tokenizer
    ids = tok.encode(context + answer)
    n_ctx = len(tok.encode(context))
    row = np.zeros((1, 256), np.int32)  # right padding (causal: no effect), one compile
    row[0, : len(ids)] = ids
    logits = np.asarray(lm.logits(row))[0, : len(ids)].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(sum(logp[t, ids[t + 1]] for t in range(n_ctx - 1, len(ids) - 1)))


@pytest.mark.slow
def test_detection_end_to_end_on_tiny_model(tmp_path, caplog):
    lm = tiny_llama(seed=1)
    shots = load_labelled(FIXTURES / "shots.jsonl", label_field="toxicity")
    config = DetectionConfig(num_shots=2, shot_seed=3)
    # Two shots make ~190-token prompts: over the tiny model's 128 positions unless the
    # scorer's max_length is raised (RoPE has no hard limit).
    result = evaluate_detection(
        lm, FIXTURES / "eval.jsonl", config=config, shots=shots, batch_size=8, max_length=256
    )
    assert "exceed max_length" not in caplog.text
    rows = load_labelled(FIXTURES / "eval.jsonl")
    assert result.labels.tolist() == rows.labels.tolist()
    assert result.scores.shape == (10,) and np.isfinite(result.scores).all()

    prefix = few_shot_prefix(shots, config)
    for text, score in zip(rows.texts[:3], result.scores[:3]):
        context = prefix + config.prompt(text)
        expected = _answer_logprob(lm, context, " Yes") - _answer_logprob(lm, context, " No")
        assert score == pytest.approx(expected, abs=1e-4)

    m = result.metrics
    assert m["auroc"] == pytest.approx(auroc(result.scores, result.labels))
    assert m["f1"] == pytest.approx(binary_metrics(result.scores >= 0, result.labels)["f1"])
    assert m["n"] == 10 and m["positives"] == 4
    assert 0.0 <= m["best_f1"] <= 1.0 and m["best_f1"] >= m["f1"]

    # The same from a saved HF dir given as a path (zero-shot), labels passed in memory.
    path = lm.save_pretrained(tmp_path / "model")
    from_path = evaluate_detection(path, LabelledTexts(rows.texts[:4], rows.labels[:4]))
    zero_shot = evaluate_detection(lm, LabelledTexts(rows.texts[:4], rows.labels[:4]))
    np.testing.assert_allclose(from_path.scores, zero_shot.scores, atol=1e-5)

    # Over max_length: a warning, and the prompt loses its start (as lm-eval truncates).
    cut = evaluate_detection(
        lm, FIXTURES / "eval.jsonl", config=config, shots=shots, limit=2, max_length=128
    )
    assert "2 of 2 prompts exceed max_length=128" in caplog.text
    assert np.abs(cut.scores - result.scores[:2]).max() > 1e-4
