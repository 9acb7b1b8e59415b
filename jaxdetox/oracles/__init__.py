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

import importlib
import importlib.util
import inspect
import os
from collections.abc import Callable
from typing import Any

from jaxdetox.oracles.base import (
    BatchOracle,
    Oracle,
    OracleArgumentError,
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
    "OracleArgumentError",
    "OracleError",
    "OracleStats",
    "OracleUnavailableError",
    "ScoreCache",
    "available",
    "check",
    "load",
    "make_labels",
    "register",
    "soft_labels",
    "text_key",
    "threshold_labels",
]


class _Lazy:
    """A built-in oracle class, imported when first used (torch, onnx stay unloaded)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    @property
    def cls(self) -> type:
        """The class itself."""
        return getattr(importlib.import_module(f"jaxdetox.oracles.{self.module}"), self.name)

    def __call__(self, *args: object, **kwargs: object) -> Oracle:
        return self.cls(*args, **kwargs)


_profanity = _Lazy("profanity", "ProfanityCheckOracle")
_FACTORIES: dict[str, Callable[..., Oracle]] = {
    "default": _profanity,
    "profanity-check": _profanity,
    "perspective": _Lazy("perspective", "PerspectiveOracle"),
    "detoxify": _Lazy("detoxify", "DetoxifyOracle"),
    "hatesonar": _Lazy("hatesonar", "HateSonarOracle"),
    "lexicon": _Lazy("constraints", "LexiconOracle"),
}
_PREFIXES = ("hf:", "py:")
_HF = _Lazy("hf", "HFClassifierOracle")
_PY = _Lazy("constraints", "CallableOracle")


def register(name: str, factory: Callable[..., Oracle]) -> None:
    """Make `load(name, **kwargs)` call `factory(**kwargs)` (plugins, tests)."""
    if not name or name.startswith(_PREFIXES):
        raise ValueError(f"oracle name {name!r} is empty or uses a reserved prefix {_PREFIXES}")
    _FACTORIES[name] = factory


def available() -> list[str]:
    """Registered oracle names (plus the `hf:<dir>` and `py:<module>:<function>` forms)."""
    return sorted(_FACTORIES) + ["hf:<dir>", "py:<module>:<function>"]


def _resolve(name: str, kwargs: dict[str, Any]) -> tuple[Callable[..., Oracle], tuple[str, ...]]:
    """`(factory, positional args)` of `name`, with `kwargs` checked against its signature
    (`OracleArgumentError` naming the arguments it accepts)."""
    if name.startswith("hf:"):
        if not name[3:]:
            raise OracleArgumentError("oracle 'hf:<dir>' needs a directory after 'hf:'")
        factory, args = _HF, (name[3:],)
    elif name.startswith("py:"):
        factory, args = _PY, (name[3:],)
    elif name in _FACTORIES:
        factory, args = _FACTORIES[name], ()
    else:
        import difflib

        close = difflib.get_close_matches(name, list(_FACTORIES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise OracleArgumentError(
            f"unknown oracle {name!r}; {hint}available: {', '.join(available())}"
        )
    target = factory.cls if isinstance(factory, _Lazy) else factory
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        return factory, args
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        params = [
            p.name
            for p in list(signature.parameters.values())[len(args) :]
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        raise OracleArgumentError(
            f"oracle {name!r}: {e} (its arguments: {', '.join(params) or 'none'})"
        ) from None
    return factory, args


def load(
    name: str, *, cache: ScoreCache | str | os.PathLike | None = None, **kwargs: object
) -> Oracle:
    """The oracle called `name`, configured by `kwargs`; wrapped in an on-disk cache if given.

    An unknown name, an argument the oracle does not take or a value it refuses raises
    `OracleArgumentError` (a `ValueError`); missing packages, weights or credentials raise
    `OracleUnavailableError`.
    """
    factory, args = _resolve(name, kwargs)
    try:
        oracle = factory(*args, **kwargs)
    except OracleError:
        raise
    except ValueError as e:  # the constructor refused an argument's value
        raise OracleArgumentError(f"oracle {name!r}: {e}") from e
    return CachedOracle(oracle, cache) if cache is not None else oracle


def check(name: str, **kwargs: object) -> None:
    """Raise what `load(name, **kwargs)` would raise for the name, the arguments and missing
    packages, files or credentials — without loading classifier weights or calling a network
    service (`--dry-run`). Cheap oracles (word lists, the default classifier, Python
    functions) are simply built."""
    factory, args = _resolve(name, kwargs)
    if factory is _HF:
        from jaxdetox.oracles.hf import classifier_dir

        classifier_dir(args[0])
        _require_modules(name, ("torch", "transformers"), "pip install 'jaxdetox[torch]'")
    elif factory is _FACTORIES.get("perspective"):
        from jaxdetox.oracles.perspective import api_key

        api_key(str(kwargs.get("api_key_env", "PERSPECTIVE_API_KEY")))
    elif factory is _FACTORIES.get("detoxify"):
        from jaxdetox.oracles.detoxify import find_checkpoint

        _require_modules(name, ("detoxify",), "pip install detoxify")
        find_checkpoint(str(kwargs.get("model_type", "original")), kwargs.get("checkpoint"))
    elif factory is _FACTORIES.get("hatesonar"):
        modules = ("hatesonar", "onnx", "onnxruntime")
        _require_modules(name, modules, "pip install 'jaxdetox[hatesonar]'")
    elif isinstance(factory, _Lazy) or factory is _PY:  # cheap to build: build it
        load(name, **kwargs)


def _require_modules(name: str, modules: tuple[str, ...], install: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise OracleUnavailableError(
            f"oracle {name!r} needs the package(s) {', '.join(missing)} ({install})"
        )
