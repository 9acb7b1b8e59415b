"""Constraint oracles users write without code of ours: a word list and a Python callable.

Both answer the oracle protocol with a *violation* score in [0, 1] (1 = the constraint is
violated, like toxicity), so the configured label transform (`1 − score^τ` or
`1[score < threshold]`, `oracles.make_labels`) turns them into NADO targets unchanged.

- `LexiconOracle` (`lexicon`): a sequence violates it when any entry of the list occurs as a
  whole word or phrase. Matching is case-insensitive (Unicode case folding after NFKC
  normalisation, so "STRASSE" matches "straße" and full-width letters match ASCII ones), at
  word boundaries in the Unicode sense (an entry never matches inside a longer word, in any
  script), and the spaces inside a phrase match any run of whitespace. With `regex=True`
  every line is a regular expression, matched with the same boundaries and folding.
- `CallableOracle` (`py:module:function`): `function(texts: list[str])` returns scores `[N]`
  in [0, 1], or `(scores, ok)`; what it cannot score it marks `ok=False` (or NaN).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxdetox.oracles.base import BatchOracle, OracleError


def fold(text: str) -> str:
    """Case- and compatibility-folded text: NFKC, then Unicode case folding."""
    return unicodedata.normalize("NFKC", text).casefold()


def read_lexicon(path: str | os.PathLike) -> list[str]:
    """Entries of a word-list file: one per line, blank lines and `#` comments skipped."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise OracleError(f"lexicon oracle: word list {file} not found (one entry per line)")
    lines = file.read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def lexicon_pattern(entries: Sequence[str], regex: bool = False) -> re.Pattern[str]:
    """One compiled alternation of the folded entries, each bounded by non-word characters."""
    parts = []
    for entry in entries:
        if regex:
            try:
                re.compile(entry)
            except re.error as err:
                raise OracleError(f"lexicon oracle: entry {entry!r} is not a regex: {err}") from err
            parts.append(f"(?:{entry})")
        else:
            words = fold(entry).split()
            parts.append(r"\s+".join(re.escape(w) for w in words))
    if not parts:
        raise OracleError("lexicon oracle: the word list is empty")
    # (?<!\w) / (?!\w) rather than \b: an entry that starts or ends with punctuation still
    # cannot match inside a word; \w is Unicode-aware for str patterns.
    flags = re.IGNORECASE if regex else 0
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", flags)


class LexiconOracle(BatchOracle):
    """Score 1 when any entry of the word list occurs in the text, else 0."""

    batch_size = 4096

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        words: Sequence[str] | None = None,
        regex: bool = False,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size)
        if (path is None) == (words is None):
            raise OracleError("lexicon oracle: give exactly one of `path` (a file) or `words`")
        entries = read_lexicon(path) if path is not None else [str(w) for w in words or ()]
        self.entries = entries
        self._pattern = lexicon_pattern(entries, regex)
        digest = hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]
        self.oracle_id = f"lexicon/{'regex' if regex else 'words'}/{len(entries)}@{digest}"

    def matches(self, text: str) -> list[str]:
        """The entries' matches in `text` (folded), in order."""
        return [m.group(0) for m in self._pattern.finditer(fold(text))]

    def _score_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        hits = [self._pattern.search(fold(t)) is not None for t in texts]
        return np.asarray(hits, np.float32), np.ones(len(texts), bool)


def import_function(spec: str) -> Callable:
    """`package.module:function` (or `module:obj.attr`) -> the callable it names."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise OracleError(f"callable oracle: {spec!r} is not of the form 'module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise OracleError(f"callable oracle: cannot import module {module_name!r}: {err}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise OracleError(f"callable oracle: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise OracleError(f"callable oracle: {spec!r} is a {type(obj).__name__}, not callable")
    return obj


class CallableOracle(BatchOracle):
    """A user function `f(texts) -> scores` or `-> (scores, ok)` as an oracle."""

    batch_size = 256

    def __init__(
        self, spec: str, *, version: str | None = None, batch_size: int | None = None
    ) -> None:
        super().__init__(batch_size)
        self.spec = spec
        self._fn = import_function(spec)
        # The cache key names the function and its version (a module `__version__` or the
        # `version` argument): bump it when the function changes, or cached scores are reused.
        module = importlib.import_module(spec.partition(":")[0])
        version = version or getattr(self._fn, "version", None)
        version = version or getattr(module, "__version__", "0")
        self.oracle_id = f"py:{spec}@{version}"

    def _score_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        out = self._fn(list(texts))
        if isinstance(out, tuple) and len(out) == 2:
            scores, ok = out
        else:
            scores, ok = out, np.ones(len(texts), bool)
        scores = np.asarray(scores, np.float32).reshape(-1)
        if scores.shape != (len(texts),):
            raise OracleError(
                f"callable oracle {self.spec}: returned {scores.size} scores for {len(texts)} texts"
            )
        return scores, np.asarray(ok, bool).reshape(-1)
