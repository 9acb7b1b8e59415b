"""The oracle protocol: `score(texts) -> (toxicity float32 [N], ok bool [N])`, batching, stats.

Every oracle answers per text with a toxicity in [0, 1] and an `ok` flag. A text the oracle
could not score (network failure, malformed answer, NaN from a model) has `ok=False` and
toxicity NaN: it is masked downstream and never counted as clean (paper code uses label −1
for the same purpose, notes §3.3).
"""

from __future__ import annotations

import abc
import dataclasses
import os
import threading
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from jaxdetox.errors import JaxdetoxError


class OracleError(JaxdetoxError, RuntimeError):
    """Base class for oracle configuration and loading errors."""


class OracleUnavailableError(OracleError):
    """The oracle's package, weights or credentials are not present on this machine."""


class OracleArgumentError(OracleError, ValueError):
    """An unknown oracle name, or arguments (`oracle.args`, `--oracle-arg`) it does not take."""


@dataclasses.dataclass
class OracleStats:
    """Counters shared by an oracle and the cache around it (thread-safe increments).

    `calls`: backend invocations (one model batch, or one HTTP request including retries).
    `texts`: texts sent to the backend. `failures`: texts that ended masked (`ok=False`).
    `retries`: repeated backend requests. `cache_hits`: texts answered from the cache.
    """

    calls: int = 0
    texts: int = 0
    failures: int = 0
    retries: int = 0
    cache_hits: int = 0
    _lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, repr=False, compare=False
    )

    def add(self, **counts: int) -> None:
        """Add `counts` (field name -> increment) under the lock."""
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + int(value))

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for logs and summaries)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}


@runtime_checkable
class Oracle(Protocol):
    """What the pipeline relies on: an id that names the exact scorer, stats, and `score`."""

    oracle_id: str
    stats: OracleStats

    def score(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Score `texts` -> (toxicity float32 [N], ok bool [N]); toxicity is NaN where not ok."""
        ...


def update_digest(digest: Any, path: str | os.PathLike) -> None:
    """Feed a file's bytes into `digest` in 4 MiB blocks (weights can be GBs)."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)


def check_texts(texts: Sequence[str]) -> list[str]:
    """Validate that `texts` is a sequence of str (a bare str is a common mistake)."""
    if isinstance(texts, str):
        raise TypeError("oracle.score expects a sequence of strings, got a single str")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"oracle.score: texts[{i}] is {type(t).__name__}, expected str")
    return out


def finalize(tox: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Enforce the output contract: float32/bool, non-finite or out-of-range -> masked, NaN."""
    tox = np.asarray(tox, dtype=np.float32).reshape(-1)
    ok = np.asarray(ok, dtype=bool).reshape(-1) & np.isfinite(tox)
    ok &= (tox >= 0.0) & (tox <= 1.0)
    return np.where(ok, tox, np.float32(np.nan)).astype(np.float32), ok


class BatchOracle(abc.ABC):
    """An oracle that scores fixed-size batches with `_score_batch`; subclasses set `oracle_id`."""

    oracle_id: str
    batch_size: int = 64

    def __init__(self, batch_size: int | None = None) -> None:
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            self.batch_size = int(batch_size)
        self.stats = OracleStats()

    @abc.abstractmethod
    def _score_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Score one batch (len <= batch_size) -> (toxicity [n], ok [n])."""

    def score(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Score `texts` batch by batch -> (toxicity float32 [N], ok bool [N])."""
        texts = check_texts(texts)
        tox = np.full(len(texts), np.nan, np.float32)
        ok = np.zeros(len(texts), bool)
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            t, k = finalize(*self._score_batch(chunk))
            if t.shape != (len(chunk),):
                raise RuntimeError(
                    f"{type(self).__name__}._score_batch returned {t.shape[0]} scores "
                    f"for {len(chunk)} texts"
                )
            tox[start : start + len(chunk)], ok[start : start + len(chunk)] = t, k
            self.stats.add(calls=1, texts=len(chunk), failures=int((~k).sum()))
        return tox, ok

    def __repr__(self) -> str:
        return f"{type(self).__name__}(oracle_id={self.oracle_id!r})"
