"""Which module implements a model family, and models built from a config alone (abstract,
or randomly initialised)."""

from __future__ import annotations

import importlib
import zlib
from types import ModuleType

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxdetox import sharding
from jaxdetox.models.config import ModelConfig


def family_module(config: ModelConfig) -> ModuleType:
    """The module implementing `config.family` (exposes MODEL_CLASS and hf_tensor_maps)."""
    return importlib.import_module(f"jaxdetox.models.{config.family}")


def abstract_model(config: ModelConfig) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves (no memory, no random init)."""
    cls = family_module(config).MODEL_CLASS
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def build_model(
    config: ModelConfig, rngs: nnx.Rngs | int = 0, *, mesh: Mesh | None = None
) -> nnx.Module:
    """A randomly initialised model of `config.family` (HF's init: N(0, initializer_range)).

    Built abstractly, then each parameter is drawn on the host with numpy (seeded by `rngs`
    and the parameter's path, so values do not depend on the mesh) and placed with its
    sharding. This avoids compiling one RNG kernel per parameter shape, which dominated
    start-up time for small models on CPU.
    """
    if isinstance(rngs, nnx.Rngs):
        seed = [int(x) for x in np.asarray(jax.random.key_data(rngs.params())).ravel()]
    else:
        seed = [int(rngs)]
    graphdef, abs_state = nnx.split(abstract_model(config))
    flat = []
    for path, var in nnx.to_flat_state(abs_state):
        name = ".".join(str(p) for p in path)
        kind = var.get_metadata().get("init", "normal")
        if kind == "normal":
            rng = np.random.default_rng([*seed, zlib.crc32(name.encode())])
            value = rng.standard_normal(var.shape, dtype=np.float32) * config.initializer_range
        else:
            value = np.full(var.shape, 1.0 if kind == "ones" else 0.0, np.float32)
        value = value.astype(var.dtype)
        flat.append((path, var.replace(sharding.place_variable(value, var, mesh))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
