"""How good a trained NADO is, on samples it was not trained on (`outputs.nado_quality`).

Every figure compares the NADO's prefix success rates `R_φ = σ(h_φ)` with the oracle's
labels `C(x, y)` on a held-out split of the iteration's samples (whole prompts held out):

- `heldout_bce`: the NADO objective itself (per-token BCE of `σ(h_φ(y_≤t)[y_t+1])` against the
  sequence label, token-weighted) on the held-out samples;
- `constant_bce`: the same BCE of the constant predictor at the training labels' mean: a NADO
  that has learnt anything beats it (a NADO that predicts the mean scores it exactly);
- `auroc`: AUROC of `R` at the last completion token (where `R = C` exactly) for telling
  satisfying samples (label ≥ 0.5) from violating ones; None when one class is missing;
- `ece`: expected calibration error of that `R` against the (soft) labels, 10 equal bins;
- `vocab_coverage`: the share of vocabulary rows whose logit training moved at the held-out
  prefixes (a free linear head moves only the rows of tokens it saw sampled);
- `bce_gain` = `constant_bce − heldout_bce` and `bce_gain_stderr`, its standard error over
  held-out prompts (a prompt's samples are one unit; the ratio-estimator error of a
  token-weighted mean): a gain beyond two of them is one the held-out split can tell apart
  from noise (`clearly_beats_constant`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

ECE_BINS = 10


def bce_bt(logit: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Elementwise BCE-with-logits (numerically stable; same formula as optax's)."""
    logit, label = np.asarray(logit, np.float64), np.asarray(label, np.float64)
    return np.maximum(logit, 0) - logit * label + np.log1p(np.exp(-np.abs(logit)))


def weighted_bce(logit: np.ndarray, label: np.ndarray, weight: np.ndarray) -> float:
    """Weighted mean of BCE-with-logits."""
    weight = np.asarray(weight, np.float64)
    bce = bce_bt(logit, label)
    total = weight.sum()
    return float((bce * weight).sum() / total) if total > 0 else float("nan")


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann–Whitney U with average ranks for ties); None when
    `positive` has only one class."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # Average rank of each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # ranks are 1-based
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def expected_calibration_error(prob: np.ndarray, label: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_bins (n_b / N)·|mean prob − mean label| over equal-width bins of `prob` in [0, 1]."""
    prob, label = np.asarray(prob, np.float64), np.asarray(label, np.float64)
    if not len(prob):
        return float("nan")
    which = np.minimum((prob * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            error += sel.mean() * abs(prob[sel].mean() - label[sel].mean())
    return float(error)


@dataclasses.dataclass(frozen=True)
class NadoQuality:
    """The held-out quality figures of one trained NADO (module docstring)."""

    heldout_bce: float
    constant_bce: float
    auroc: float | None
    ece: float
    vocab_coverage: float
    heldout_samples: int
    label_mean: float
    bce_gain: float
    bce_gain_stderr: float | None = None

    @property
    def beats_constant(self) -> bool:
        """Whether the NADO's held-out BCE is below the constant predictor's."""
        return self.heldout_bce < self.constant_bce

    @property
    def clearly_beats_constant(self) -> bool | None:
        """Whether the BCE gain exceeds two standard errors (None: no error, < 2 prompts)."""
        if self.bce_gain_stderr is None:
            return None
        return self.bce_gain > 2 * self.bce_gain_stderr

    def to_json(self) -> dict[str, Any]:
        """The `outputs.nado_quality` record."""
        return {
            **dataclasses.asdict(self),
            "beats_constant": self.beats_constant,
            "clearly_beats_constant": self.clearly_beats_constant,
        }


def bce_gain_stderr(
    gain_bt: np.ndarray, weight_bt: np.ndarray, groups_b: np.ndarray
) -> float | None:
    """Standard error over groups of the token-weighted mean of `gain_bt` (ratio estimator:
    √(Σ_g W_g² (d_g − D)² · G/(G−1)) / Σ_g W_g, W_g a group's weight, d_g its weighted mean,
    D the overall one); None with fewer than two groups."""
    unique, which = np.unique(np.asarray(groups_b), return_inverse=True)
    w_g = np.bincount(which, weights=weight_bt.sum(axis=1), minlength=len(unique))
    s_g = np.bincount(which, weights=(gain_bt * weight_bt).sum(axis=1), minlength=len(unique))
    keep = w_g > 0
    w_g, s_g = w_g[keep], s_g[keep]
    n = len(w_g)
    if n < 2:
        return None
    mean = s_g.sum() / w_g.sum()
    # W_g·(d_g − D) = S_g − W_g·D
    return float(np.sqrt(np.sum((s_g - w_g * mean) ** 2) * n / (n - 1)) / w_g.sum())


def nado_quality(
    token_logit_bt: np.ndarray,
    labels_b: np.ndarray,
    weight_bt: np.ndarray,
    train_label_mean: float,
    moved_v: np.ndarray,
    groups_b: np.ndarray | None = None,
) -> NadoQuality:
    """Quality figures from the NADO's logits of the realised tokens on held-out samples.

    `token_logit_bt[b, t]` = h_φ(y_≤t)[y_t+1] (next-token aligned, as the BCE), `weight_bt`
    non-zero at labelled completion positions, `labels_b` the sequence labels,
    `train_label_mean` the token-weighted mean label of the training split (the constant
    predictor), `moved_v` bool `[V]`: rows whose logit changed at some held-out prefix,
    `groups_b` the rows' prompt ids (for the gain's standard error; None: no error).
    """
    token_logit_bt = np.asarray(token_logit_bt, np.float64)
    weight_bt = np.asarray(weight_bt, np.float64)
    labels_b = np.asarray(labels_b, np.float64)
    labels_bt = np.broadcast_to(labels_b[:, None], token_logit_bt.shape)
    rate = float(np.clip(train_label_mean, 1e-6, 1 - 1e-6))
    constant = np.full_like(token_logit_bt, np.log(rate) - np.log1p(-rate))
    rows = np.flatnonzero(weight_bt.sum(axis=1) > 0)
    # The last labelled position of each row predicts its last completion token: R = C there.
    last = np.array([np.flatnonzero(weight_bt[b])[-1] for b in rows], np.int64)
    r_last = 1.0 / (1.0 + np.exp(-token_logit_bt[rows, last]))
    heldout, const = (
        weighted_bce(logit, labels_bt, weight_bt) for logit in (token_logit_bt, constant)
    )
    gain_se = None
    if groups_b is not None:
        gain_bt = bce_bt(constant, labels_bt) - bce_bt(token_logit_bt, labels_bt)
        gain_se = bce_gain_stderr(gain_bt, weight_bt, groups_b)
    return NadoQuality(
        heldout_bce=heldout,
        constant_bce=const,
        auroc=auroc(r_last, labels_b[rows] >= 0.5),
        ece=expected_calibration_error(r_last, labels_b[rows]),
        vocab_coverage=float(np.mean(np.asarray(moved_v, bool))),
        heldout_samples=len(rows),
        label_mean=float(train_label_mean),
        bce_gain=const - heldout,
        bce_gain_stderr=gain_se,
    )


def heldout_split(
    prompt_ids: np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`(train_rows, heldout_rows)`: row indices, whole prompts held out (a prompt's samples
    share its prefix, so splitting them would leak), about `fraction` of the prompts (at
    least one when `fraction > 0` and there are two or more), chosen by `seed`."""
    prompt_ids = np.asarray(prompt_ids)
    rows = np.arange(len(prompt_ids))
    unique = np.unique(prompt_ids)
    n_held = int(round(fraction * len(unique)))
    if fraction > 0 and len(unique) >= 2:
        n_held = min(max(n_held, 1), len(unique) - 1)
    else:
        n_held = 0
    held = np.random.default_rng(seed).permutation(unique)[:n_held]
    is_held = np.isin(prompt_ids, held)
    return rows[~is_held], rows[is_held]
