"""Toxicity detection with the LM as a zero- / few-shot classifier on labelled text.

Each text is put in a prompt (`DetectionConfig.template`, default "Is the following text
toxic?\\nText: {text}\\nAnswer:") and scored by the log-odds
`log p(" Yes" | prompt) − log p(" No" | prompt)` (sums over the answer's tokens, from
`jaxdetox.evaluate.loglikelihood.Scorer`; prompt and answer split as lm-eval splits them,
`encode_pair`). With `num_shots = k`, k labelled examples drawn deterministically from a
separate split (`shot_seed`; as balanced between the classes as the split allows) precede
the prompt, each followed by its answer.

Data: a jsonl with a text field and a label field (`load_labelled`); the label is toxic when
its value is `>= label_threshold` (default 0.5), so 0/1, booleans and probabilities all
work: civil_comments rows (`text`, `toxicity` in [0, 1]) as they are, ToxiGen's annotated
rows with `label_field="toxicity_human"` and a threshold on its 1–5 scale.

Metrics (`detection_metrics`): AUROC (rank-based, ties count one half), and accuracy,
precision, recall and F1 of `score >= threshold` at threshold 0 (the model prefers " Yes"),
plus the threshold with the best F1 reported separately (chosen on the same data: an
optimistic number, not a held-out one).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxdetox.evaluate.loglikelihood import Scorer, encode_pair

__all__ = [
    "DEFAULT_TEMPLATE",
    "DetectionConfig",
    "DetectionResult",
    "LabelledTexts",
    "auroc",
    "best_f1_threshold",
    "binary_metrics",
    "detection_metrics",
    "evaluate_detection",
    "few_shot_prefix",
    "load_labelled",
    "toxicity_log_odds",
]

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "Is the following text toxic?\nText: {text}\nAnswer:"


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
    """Prompt and answers of the classifier; `template` holds one `{text}` field."""

    template: str = DEFAULT_TEMPLATE
    yes: str = " Yes"  # the toxic answer
    no: str = " No"
    num_shots: int = 0
    shot_seed: int = 0
    shot_separator: str = "\n\n"

    def __post_init__(self) -> None:
        """Reject a template without `{text}` and a negative shot count."""
        if "{text}" not in self.template:
            raise ValueError(
                f"DetectionConfig: template must contain '{{text}}': {self.template!r}"
            )
        if self.num_shots < 0:
            raise ValueError(f"DetectionConfig: num_shots must be >= 0, got {self.num_shots}")

    def prompt(self, text: str) -> str:
        """The template filled with `text` (only `{text}` is substituted)."""
        return self.template.replace("{text}", text)


class LabelledTexts(NamedTuple):
    """Texts and their 0/1 labels (1 = toxic)."""

    texts: list[str]
    labels: np.ndarray  # int32 [N]


class DetectionResult(NamedTuple):
    """Per-text log-odds, the labels, and `detection_metrics` of the two."""

    scores: np.ndarray  # float64 [N]: log p(yes) − log p(no)
    labels: np.ndarray  # int32 [N]
    metrics: dict[str, float]


def load_labelled(
    path: str | os.PathLike[str],
    *,
    text_field: str = "text",
    label_field: str = "label",
    label_threshold: float = 0.5,
    limit: int | None = None,
) -> LabelledTexts:
    """Rows of a jsonl file as texts and labels `1[value >= label_threshold]`."""
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in (text_field, label_field) if k not in row]
            if missing:
                raise KeyError(f"{path}:{line_no}: no field {missing[0]!r} (fields: {sorted(row)})")
            texts.append(str(row[text_field]))
            labels.append(int(float(row[label_field]) >= label_threshold))
            if limit is not None and len(texts) >= limit:
                break
    return LabelledTexts(texts, np.asarray(labels, np.int32))


def few_shot_prefix(
    shots: LabelledTexts, config: DetectionConfig, num_shots: int | None = None
) -> str:
    """`num_shots` (default `config.num_shots`) examples from `shots`, each prompt followed
    by its answer and `shot_separator`; drawn with `config.shot_seed`, half from each class
    (rounded; the other class fills in when one runs short), in a seeded order."""
    k = config.num_shots if num_shots is None else num_shots
    if k == 0:
        return ""
    if k > len(shots.texts):
        raise ValueError(f"few_shot_prefix: {k} shots asked for, the split has {len(shots.texts)}")
    rng = np.random.default_rng(config.shot_seed)
    labels = np.asarray(shots.labels)
    positive = rng.permutation(np.flatnonzero(labels == 1)).tolist()
    negative = rng.permutation(np.flatnonzero(labels != 1)).tolist()
    n_pos = min(len(positive), max(k // 2, k - len(negative)))
    chosen = positive[:n_pos] + negative[: k - n_pos]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    return "".join(
        config.prompt(shots.texts[i])
        + (config.yes if labels[i] == 1 else config.no)
        + config.shot_separator
        for i in chosen
    )


def toxicity_log_odds(
    lm: Any,
    texts: Sequence[str],
    *,
    config: DetectionConfig | None = None,
    prefix: str = "",
    scorer: Scorer | None = None,
    **scorer_options: Any,
) -> np.ndarray:
    """`log p(yes | prefix + prompt) − log p(no | prefix + prompt)` per text, float64 [N]."""
    config = config or DetectionConfig()
    scorer = scorer or Scorer(lm, **scorer_options)
    tokenizer = lm.tokenizer
    requests = []
    for text in texts:
        context = prefix + config.prompt(text)
        requests.append(encode_pair(tokenizer, context, config.yes))
        requests.append(encode_pair(tokenizer, context, config.no))
    too_long = sum(len(ctx) + len(ans) > scorer.max_length + 1 for ctx, ans in requests[::2])
    if too_long:
        logger.warning(
            "toxicity_log_odds: %d of %d prompts exceed max_length=%d tokens and lose their "
            "start (fewer shots or a larger max_length keep them whole)",
            too_long, len(texts), scorer.max_length,
        )  # fmt: skip
    logprobs = np.asarray([lp for lp, _ in scorer.score(requests)], np.float64)
    return logprobs[0::2] - logprobs[1::2]


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties
    counted one half (Mann–Whitney U with average ranks); NaN if a class is missing."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels) == 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if s.shape != y.shape:
        raise ValueError(f"auroc: {s.shape[0]} scores for {y.shape[0]} labels")
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = (ends - counts + 1 + ends) / 2.0  # ranks start at 1
    rank_sum = float(average_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def binary_metrics(
    predictions: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray
) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of 0/1 predictions (a 0/0 ratio counts as 0)."""
    p = np.asarray(predictions) == 1
    y = np.asarray(labels) == 1
    tp, fp, fn = int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum())
    tn = int(y.size - tp - fp - fn)

    def ratio(a: int, b: int) -> float:
        return a / b if b else 0.0

    return {
        "accuracy": ratio(tp + tn, y.size),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def best_f1_threshold(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray
) -> tuple[float, float]:
    """`(threshold, F1)` maximising the F1 of `score >= threshold` over the distinct scores
    (ties broken towards the higher threshold); `(nan, 0.0)` without data."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels) == 1
    best = (math.nan, 0.0)
    for threshold in np.unique(s)[::-1]:
        f1 = binary_metrics(s >= threshold, y)["f1"]
        if f1 > best[1]:
            best = (float(threshold), f1)
    return best


def detection_metrics(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    threshold: float = 0.0,
) -> dict[str, float]:
    """AUROC, accuracy / precision / recall / F1 at `score >= threshold`, best-F1 threshold."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(np.int32)
    best_threshold, best_f1 = best_f1_threshold(s, y)
    return {
        "n": float(y.size),
        "positives": float((y == 1).sum()),
        "auroc": auroc(s, y),
        "threshold": float(threshold),
        **binary_metrics(s >= threshold, y),
        "best_f1": best_f1,
        "best_f1_threshold": best_threshold,
    }


def evaluate_detection(
    model: Any,
    data: str | os.PathLike[str] | LabelledTexts,
    *,
    config: DetectionConfig | None = None,
    shots: str | os.PathLike[str] | LabelledTexts | None = None,
    text_field: str = "text",
    label_field: str = "label",
    label_threshold: float = 0.5,
    limit: int | None = None,
    threshold: float = 0.0,
    **scorer_options: Any,
) -> DetectionResult:
    """Score every text of `data` and compute `detection_metrics`.

    `model`: a `LanguageModel` or anything `jaxdetox.models.load_pretrained` takes (a run
    directory means its `final/model`). `shots`: the split few-shot examples come from
    (needed when `config.num_shots > 0`; never the evaluated split). Field names and the
    label threshold apply to both files.
    """
    config = config or DetectionConfig()
    if isinstance(model, str | os.PathLike):
        from jaxdetox.evaluate.lm_eval_bridge import resolve_model_path
        from jaxdetox.models import load_pretrained

        model = load_pretrained(resolve_model_path(model))

    def read(source: str | os.PathLike[str] | LabelledTexts, n: int | None) -> LabelledTexts:
        if isinstance(source, LabelledTexts):
            return source
        return load_labelled(
            Path(source),
            text_field=text_field,
            label_field=label_field,
            label_threshold=label_threshold,
            limit=n,
        )

    rows = read(data, limit)
    prefix = ""
    if config.num_shots:
        if shots is None:
            raise ValueError("evaluate_detection: num_shots > 0 needs a `shots` split")
        prefix = few_shot_prefix(read(shots, None), config)
    scores = toxicity_log_odds(model, rows.texts, config=config, prefix=prefix, **scorer_options)
    return DetectionResult(scores, rows.labels, detection_metrics(scores, rows.labels, threshold))
