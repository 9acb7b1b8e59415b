"""Toxicity oracles behind one protocol: `load(name).score(texts) -> (toxicity, ok)`.

```python
from jaxdetox import oracles
oracle = oracles.load("default", cache="runs/x/oracle_cache.sqlite")
toxicity, ok = oracle.score(["some text", ...])  # float32 [N] (NaN where not ok), bool [N]
labels, mask = oracles.make_labels(toxicity, ok, tau=1.0)  # or threshold=0.5
```

Names: "default" / "profanity-check" (offline, alt-profanity-check), "hf:<dir>" (any local HF
sequence-classification checkpoint, e.g. ToxiGen-RoBERTa), "perspective" (API key in
$PERSPECTIVE_API_KEY), "detoxify" (local weights only),
"hatesonar" (offline, optional extra).
Constraints written without code (jaxdetox/oracles/constraints.py): "lexicon" (a word-list
file, `path=`: violated when an entry occurs; case-insensitive, Unicode word boundaries),
"py:<module>:<function>" (any Python function of the texts), and "hf:<dir>" with `label=` /
`satisfied_label=` for any classifier. Every oracle's score is a violation score in [0, 1].
"""

from __future__ import annotations

import os
from collections.abc import Callable

from jaxdetox.oracles.base import (
    BatchOracle,
    Oracle,
    OracleError,
    OracleStats,
    OracleUnavailableError,
)
from jaxdetox.oracles.cache import CachedOracle, ScoreCache, text_key
from jaxdetox.oracles.labels import make_labels, soft_labels, threshold_labels

__all__ = [
    "BatchOracle",
    "CachedOracle",
    "Oracle",
    "OracleError",
    "OracleStats",
    "OracleUnavailableError",
    "ScoreCache",
    "available",
    "load",
    "make_labels",
    "register",
    "soft_labels",
    "text_key",
    "threshold_labels",
]


def _profanity(**kwargs: object) -> Oracle:
    from jaxdetox.oracles.profanity import ProfanityCheckOracle

    return ProfanityCheckOracle(**kwargs)


def _perspective(**kwargs: object) -> Oracle:
    from jaxdetox.oracles.perspective import PerspectiveOracle

    return PerspectiveOracle(**kwargs)


def _detoxify(**kwargs: object) -> Oracle:
    from jaxdetox.oracles.detoxify import DetoxifyOracle

    return DetoxifyOracle(**kwargs)


def _hatesonar(**kwargs: object) -> Oracle:
    from jaxdetox.oracles.hatesonar import HateSonarOracle

    return HateSonarOracle(**kwargs)


def _lexicon(**kwargs: object) -> Oracle:
    from jaxdetox.oracles.constraints import LexiconOracle

    return LexiconOracle(**kwargs)


_FACTORIES: dict[str, Callable[..., Oracle]] = {
    "default": _profanity,
    "profanity-check": _profanity,
    "perspective": _perspective,
    "detoxify": _detoxify,
    "hatesonar": _hatesonar,
    "lexicon": _lexicon,
}
_PREFIXES = ("hf:", "py:")


def register(name: str, factory: Callable[..., Oracle]) -> None:
    """Make `load(name, **kwargs)` call `factory(**kwargs)` (plugins, tests)."""
    if not name or name.startswith(_PREFIXES):
        raise ValueError(f"oracle name {name!r} is empty or uses a reserved prefix {_PREFIXES}")
    _FACTORIES[name] = factory


def available() -> list[str]:
    """Registered oracle names (plus the `hf:<dir>` and `py:<module>:<function>` forms)."""
    return sorted(_FACTORIES) + ["hf:<dir>", "py:<module>:<function>"]


def load(
    name: str, *, cache: ScoreCache | str | os.PathLike | None = None, **kwargs: object
) -> Oracle:
    """The oracle called `name`, configured by `kwargs`; wrapped in an on-disk cache if given."""
    if name.startswith("hf:"):
        from jaxdetox.oracles.hf import HFClassifierOracle

        if not name[3:]:
            raise ValueError("oracle 'hf:<dir>' needs a directory after 'hf:'")
        oracle: Oracle = HFClassifierOracle(name[3:], **kwargs)
    elif name.startswith("py:"):
        from jaxdetox.oracles.constraints import CallableOracle

        oracle = CallableOracle(name[3:], **kwargs)
    elif name in _FACTORIES:
        oracle = _FACTORIES[name](**kwargs)
    else:
        raise ValueError(f"unknown oracle {name!r}; available: {', '.join(available())}")
    return CachedOracle(oracle, cache) if cache is not None else oracle
