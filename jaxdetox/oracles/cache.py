"""On-disk score cache keyed by (oracle id incl. version, sha256 of the text).

sqlite3 in WAL mode: readers do not block the writer, and every batch is its own committed
transaction, so a crash (or a kill) mid-run keeps every finished batch and a resumed run
scores only what is missing. Failed texts (`ok=False`) are never written: a later run
retries them instead of inheriting a transient failure.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence

import numpy as np

from jaxdetox.oracles.base import Oracle, OracleStats, check_texts

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    oracle_id TEXT NOT NULL,
    text_sha256 TEXT NOT NULL,
    toxicity REAL NOT NULL,
    PRIMARY KEY (oracle_id, text_sha256)
) WITHOUT ROWID
"""
# sqlite limits bound parameters per statement (32766 in modern builds); stay well below.
_LOOKUP_CHUNK = 900


def text_key(text: str) -> str:
    """The cache key of one text: hex sha256 of its UTF-8 bytes (exact text, no normalising)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ScoreCache:
    """A sqlite3 table of (oracle_id, text hash) -> toxicity, safe to share between threads."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL under WAL: a committed batch survives a process crash (not a power cut).
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(_SCHEMA)
        self._conn.commit()

    def get_many(self, oracle_id: str, keys: Sequence[str]) -> dict[str, float]:
        """Cached toxicities for those of `keys` present under `oracle_id`."""
        found: dict[str, float] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(unique), _LOOKUP_CHUNK):
                part = unique[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(part))
                rows = self._conn.execute(
                    f"SELECT text_sha256, toxicity FROM scores "
                    f"WHERE oracle_id = ? AND text_sha256 IN ({marks})",
                    [oracle_id, *part],
                ).fetchall()
                found.update(rows)
        return found

    def put_many(self, oracle_id: str, items: Iterable[tuple[str, float]]) -> None:
        """Insert (key, toxicity) pairs under `oracle_id` and commit them as one transaction."""
        rows = [(oracle_id, key, float(tox)) for key, tox in items]
        if not rows:
            return
        with self._lock, self._conn:  # the connection context manager commits or rolls back
            self._conn.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?)", rows)

    def count(self, oracle_id: str | None = None) -> int:
        """Number of cached scores (for one oracle id, or all)."""
        with self._lock:
            if oracle_id is None:
                return self._conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
            return self._conn.execute(
                "SELECT COUNT(*) FROM scores WHERE oracle_id = ?", (oracle_id,)
            ).fetchone()[0]

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    def __repr__(self) -> str:
        return f"ScoreCache({self.path!r})"


class CachedOracle:
    """Wraps an oracle: answers cached texts from disk, scores the rest in committed chunks."""

    def __init__(self, oracle: Oracle, cache: ScoreCache | str | os.PathLike) -> None:
        self.inner = oracle
        self.cache = cache if isinstance(cache, ScoreCache) else ScoreCache(cache)
        self.oracle_id: str = oracle.oracle_id
        self.stats: OracleStats = oracle.stats
        # Commit granularity: the inner oracle's own batch size, so at most one batch is lost.
        self.chunk_size = int(getattr(oracle, "batch_size", 64) or 64)

    def score(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Score `texts`, reading and writing the cache -> (toxicity float32 [N], ok bool [N])."""
        texts = check_texts(texts)
        keys = [text_key(t) for t in texts]
        tox = np.full(len(texts), np.nan, np.float32)
        ok = np.zeros(len(texts), bool)
        cached = self.cache.get_many(self.oracle_id, keys)
        # Duplicates inside one call are scored once; every copy gets the same answer.
        todo: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if key in cached:
                tox[i], ok[i] = cached[key], True
            else:
                todo.setdefault(key, []).append(i)
        self.stats.add(cache_hits=len(texts) - sum(len(v) for v in todo.values()))
        pending = list(todo.items())
        for start in range(0, len(pending), self.chunk_size):
            chunk = pending[start : start + self.chunk_size]
            t, k = self.inner.score([texts[idx[0]] for _, idx in chunk])
            self.cache.put_many(
                self.oracle_id, [(key, t[j]) for j, (key, _) in enumerate(chunk) if k[j]]
            )
            for j, (_, idx) in enumerate(chunk):
                tox[idx], ok[idx] = t[j], k[j]
        return tox, ok

    def __repr__(self) -> str:
        return f"CachedOracle({self.inner!r}, cache={self.cache!r})"
