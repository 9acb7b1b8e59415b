"""Flax NNX model families (Llama, GPT-2), the NADO auxiliary model and HF/GGUF interop.

`LanguageModel`, `load_pretrained` and `random_init` live in `jaxdetox.lm` (above this
package and `jaxdetox.sampling`); they are forwarded here on attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

from jaxdetox.models.cache import KVCache, init_cache
from jaxdetox.models.config import ModelConfig, UnsupportedConfigError
from jaxdetox.models.hf import CheckpointError, from_hf_tensors
from jaxdetox.models.nado import NadoConfig, NadoModel, init_nado, load_nado, save_nado
from jaxdetox.models.registry import build_model

_FROM_LM = ("LanguageModel", "load_pretrained", "random_init")


def __getattr__(name: str) -> Any:
    """`from jaxdetox.models import load_pretrained` (and `LanguageModel`, `random_init`).

    They are `jaxdetox.lm`'s, which imports `jaxdetox.sampling` for `generate`; an eager
    import here would make every user of the model code (the sampler itself, the losses'
    tests, a training step) import the sampler. PEP 562: resolved on first access only.
    """
    if name in _FROM_LM:
        return getattr(importlib.import_module("jaxdetox.lm"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "KVCache",
    "LanguageModel",
    "ModelConfig",
    "NadoConfig",
    "NadoModel",
    "UnsupportedConfigError",
    "build_model",
    "from_hf_tensors",
    "init_cache",
    "init_nado",
    "load_nado",
    "load_pretrained",
    "random_init",
    "save_nado",
]
