"""Flax NNX model families (Llama, GPT-2), the NADO auxiliary model and HF/GGUF interop."""

from jaxdetox.models.cache import KVCache, init_cache
from jaxdetox.models.config import ModelConfig, UnsupportedConfigError
from jaxdetox.models.hf import CheckpointError, from_hf_tensors, load_pretrained
from jaxdetox.models.lm import LanguageModel, build_model, random_init
from jaxdetox.models.nado import NadoConfig, NadoModel, init_nado, load_nado, save_nado

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
