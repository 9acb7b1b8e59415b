"""Google Perspective API client (the paper's GPT-2-pipeline oracle; notes §3.3).

One TOXICITY request per text, `concurrency` worker threads sharing one QPS limiter, retries
with exponential backoff (and `Retry-After`) on 429, 5xx, timeouts, connection errors and
malformed answers; other 4xx are final. A text that never gets a valid score ends masked.

The API key comes from an environment variable and travels only in the `x-goog-api-key`
request header, never in the URL, so it cannot leak through URLs in exceptions; every log
line is additionally scrubbed of it, and it is kept out of `repr`.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jaxdetox.oracles.base import OracleStats, OracleUnavailableError, check_texts, finalize

logger = logging.getLogger(__name__)

DEFAULT_URL = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


class _Secret:
    """Holds a credential; its str/repr never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The raw credential (only for the request header)."""
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


class _RateLimiter:
    """Spaces request starts at least 1/qps apart across all threads (qps <= 0: no limit)."""

    def __init__(self, qps: float) -> None:
        self.interval = 1.0 / qps if qps and qps > 0 else 0.0
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self) -> None:
        """Block until this caller's slot; slots are handed out in arrival order."""
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


class _Retryable(Exception):
    """A failure worth another attempt; `retry_after` is the server's hint in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Final(Exception):
    """A failure that another attempt would not fix (e.g. HTTP 400 unsupported language)."""


def api_key(env: str) -> str:
    """The API key in environment variable `env` (`OracleUnavailableError` when unset)."""
    key = os.environ.get(env, "").strip()
    if not key:
        raise OracleUnavailableError(
            f"perspective oracle: set the environment variable {env} to an API key"
        )
    return key


class PerspectiveOracle:
    """Perspective API `summaryScore` of one attribute (TOXICITY) as the toxicity."""

    def __init__(
        self,
        *,
        api_key_env: str = "PERSPECTIVE_API_KEY",
        url: str = DEFAULT_URL,
        attribute: str = "TOXICITY",
        languages: Sequence[str] = ("en",),
        qps: float = 1.0,
        concurrency: int = 8,
        max_retries: int = 3,
        timeout: float = 10.0,
        backoff_base: float = 1.0,
        backoff_max: float = 32.0,
        batch_size: int = 32,
        do_not_store: bool = True,
    ) -> None:
        key = api_key(api_key_env)
        if concurrency < 1 or max_retries < 0 or timeout <= 0 or batch_size < 1:
            raise ValueError(
                "perspective oracle: need concurrency >= 1, max_retries >= 0, timeout > 0, "
                f"batch_size >= 1 (got {concurrency}, {max_retries}, {timeout}, {batch_size})"
            )
        self._key = _Secret(key)
        self.url = url
        self.attribute = attribute
        self.languages = list(languages)
        self.qps = float(qps)
        self.concurrency = int(concurrency)
        self.max_retries = int(max_retries)
        self.timeout = float(timeout)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.batch_size = int(batch_size)
        self.do_not_store = bool(do_not_store)
        self.stats = OracleStats()
        self._limiter = _RateLimiter(self.qps)
        host = urllib.parse.urlsplit(url).hostname or ""
        # Loopback (the tests' fake server) must never be routed through an HTTP proxy.
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)
        # Perspective's models change server-side without a version in the answer; the id
        # pins what we control (endpoint version, attribute, languages).
        path_version = urllib.parse.urlsplit(url).path.strip("/").split("/")[0] or "v?"
        self.oracle_id = f"perspective/{path_version}/{attribute}/{','.join(self.languages)}"

    def __repr__(self) -> str:
        return (
            f"PerspectiveOracle(url={self.url!r}, attribute={self.attribute!r}, "
            f"qps={self.qps}, concurrency={self.concurrency}, max_retries={self.max_retries})"
        )

    def _scrub(self, message: str) -> str:
        return message.replace(self._key.reveal(), "<secret>")

    def _request_once(self, text: str) -> float:
        body = {
            "comment": {"text": text},
            "languages": self.languages,
            "requestedAttributes": {self.attribute: {}},
            "doNotStore": self.do_not_store,
        }
        request = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": "application/json", "x-goog-api-key": self._key.reveal()},
            method="POST",
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            retry_after = _parse_retry_after(
                err.headers.get("Retry-After") if err.headers else None
            )
            err.close()
            if err.code == 429 or err.code >= 500:
                raise _Retryable(f"HTTP {err.code}", retry_after) from None
            raise _Final(f"HTTP {err.code}") from None
        except (TimeoutError, OSError, http.client.HTTPException) as err:
            # URLError, ConnectionError and socket timeouts are all OSError subclasses.
            reason = getattr(err, "reason", None)
            raise _Retryable(f"{type(err).__name__}: {reason if reason else err}") from None
        try:
            value = json.loads(raw)["attributeScores"][self.attribute]["summaryScore"]["value"]
            value = float(value)
        except (ValueError, KeyError, TypeError, IndexError):
            raise _Retryable("malformed response") from None
        if not 0.0 <= value <= 1.0:
            raise _Retryable(f"score {value!r} outside [0, 1]")
        return value

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        # Full jitter in [0.5, 1] x the exponential step keeps concurrent retries apart.
        delay = self.backoff_base * (2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.backoff_max)

    def _score_one(self, text: str) -> tuple[float, bool]:
        retry_after: float | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.add(retries=1)
                time.sleep(self._backoff(attempt, retry_after))
            self._limiter.wait()
            self.stats.add(calls=1)
            try:
                return self._request_once(text), True
            except _Retryable as err:
                retry_after = err.retry_after
                logger.warning(
                    "perspective: %s (attempt %d of %d)",
                    self._scrub(str(err)),
                    attempt + 1,
                    self.max_retries + 1,
                )
            except _Final as err:
                logger.warning("perspective: %s, not retried; text masked", self._scrub(str(err)))
                return float("nan"), False
        logger.warning("perspective: giving up after %d attempts; text masked", attempt + 1)
        return float("nan"), False

    def score(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Score `texts` with concurrent rate-limited requests -> (toxicity [N], ok [N])."""
        texts = check_texts(texts)
        if not texts:
            return np.zeros(0, np.float32), np.zeros(0, bool)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(texts))) as pool:
            results = list(pool.map(self._score_one, texts))
        tox, ok = finalize(np.array([r[0] for r in results]), np.array([r[1] for r in results]))
        self.stats.add(texts=len(texts), failures=int((~ok).sum()))
        return tox, ok


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds form only; dates are ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
