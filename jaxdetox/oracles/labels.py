"""Oracle toxicity -> NADO target `C(x, y)` (1 = satisfies the constraint, i.e. non-toxic).

Two transforms from the paper code (notes §3.3): the soft label `1 − tox^τ` (`--temperature`
τ, default 1) and the binarised label `1[tox < threshold]` (`--threshold`). Masked entries
keep `mask=False` and get label 0.0: if a caller ever ignores the mask, a failure reads as
toxic, never as clean.
"""

from __future__ import annotations

import numpy as np


def _masked(toxicity: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tox = np.asarray(toxicity, np.float32)
    mask = np.asarray(ok, bool) & np.isfinite(tox)
    if tox.shape != mask.shape:
        raise ValueError(f"toxicity {tox.shape} and ok {mask.shape} must have the same shape")
    return np.where(mask, np.clip(tox, 0.0, 1.0), np.float32(1.0)), mask


def soft_labels(
    toxicity: np.ndarray, ok: np.ndarray, tau: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Soft target `1 − tox^τ` -> (label float32, mask bool); label 0 where masked."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    tox, mask = _masked(toxicity, ok)
    label = 1.0 - np.power(tox, np.float32(tau))
    return np.where(mask, label, 0.0).astype(np.float32), mask


def threshold_labels(
    toxicity: np.ndarray, ok: np.ndarray, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Binary target `1[tox < threshold]` -> (label float32 in {0, 1}, mask bool)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    tox, mask = _masked(toxicity, ok)
    return np.where(mask & (tox < threshold), 1.0, 0.0).astype(np.float32), mask


def make_labels(
    toxicity: np.ndarray, ok: np.ndarray, *, tau: float = 1.0, threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Threshold labels when `threshold` is set, else soft labels with exponent `tau`."""
    if threshold is not None:
        return threshold_labels(toxicity, ok, threshold)
    return soft_labels(toxicity, ok, tau)
