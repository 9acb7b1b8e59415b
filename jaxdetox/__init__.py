"""jaxdetox: attribute-controlled (NADO-regularised) fine-tuning of LLMs in JAX/Flax."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`jaxdetox.load_pretrained`: `jaxdetox.lm.load_pretrained`, imported on first access so
    that importing any subpackage (e.g. `jaxdetox.models`) does not import the sampler."""
    if name == "load_pretrained":
        return importlib.import_module("jaxdetox.lm").load_pretrained
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
