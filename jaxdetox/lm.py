"""`LanguageModel`: what `load_pretrained` returns; model + config + tokenizer + mesh.

Also `build_model` / `random_init` for randomly initialised models (tests, NADO bodies,
benchmarks). With a mesh, initialisation runs under `jit` with `out_shardings`, so every
device creates only its own shard of each parameter.
"""

from __future__ import annotations

import functools
import os
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxdetox import sharding
from jaxdetox.models.config import ModelConfig
from jaxdetox.models.hf import abstract_model


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


def random_init(
    config: ModelConfig, seed: int = 0, *, mesh: Mesh | None = None, tokenizer: Any = None
) -> LanguageModel:
    """A `LanguageModel` with random weights."""
    return LanguageModel(config, build_model(config, seed, mesh=mesh), tokenizer, mesh)


@functools.partial(jax.jit, static_argnums=0)
def _logits(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens_bt: jax.Array,
    segment_ids_bt: jax.Array | None,
    positions_bt: jax.Array | None,
) -> jax.Array:
    logits_btv, _ = nnx.merge(graphdef, state)(
        tokens_bt, segment_ids_bt=segment_ids_bt, positions_bt=positions_bt
    )
    return logits_btv


class LanguageModel:
    """A causal LM ready to use: `logits`, `generate`, `save_pretrained`."""

    def __init__(
        self,
        config: ModelConfig,
        model: nnx.Module,
        tokenizer: Any = None,
        mesh: Mesh | None = None,
    ):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.mesh = mesh

    def split(self) -> tuple[nnx.GraphDef, nnx.State]:
        """`(graphdef, params)` for pure functions: `nnx.merge(graphdef, params)` inside jit."""
        graphdef, params = nnx.split(self.model, nnx.Param)
        return graphdef, params

    def _place(self, x: Any) -> jax.Array | None:
        if x is None:
            return None
        x = jnp.asarray(x, jnp.int32)
        if self.mesh is not None:
            x = jax.device_put(x, sharding.batch_sharding(self.mesh, x.shape))
        return x

    def logits(
        self,
        tokens: np.ndarray | jax.Array,
        *,
        segment_ids: np.ndarray | jax.Array | None = None,
        positions: np.ndarray | jax.Array | None = None,
    ) -> jax.Array:
        """int32 tokens `[B, T]` -> float32 logits `[B, T, V]` (jit-compiled once per shape)."""
        tokens = np.asarray(tokens) if not isinstance(tokens, jax.Array) else tokens
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected shape [B, T], got {tuple(tokens.shape)}")
        graphdef, state = nnx.split(self.model)
        args = (self._place(tokens), self._place(segment_ids), self._place(positions))
        if self.mesh is None:
            return _logits(graphdef, state, *args)
        with jax.set_mesh(self.mesh):
            return _logits(graphdef, state, *args)

    def save_pretrained(self, out: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write an HF checkpoint dir loadable by transformers.AutoModelForCausalLM."""
        from jaxdetox.models.hf import save_pretrained

        return save_pretrained(self.model, out, tokenizer=self.tokenizer, **kwargs)

    def generate(self, tokens: np.ndarray | jax.Array, **kwargs: Any) -> jax.Array:
        """Sample continuations (see `jaxdetox.sampling.generate`; DESIGN.md §4)."""
        try:
            from jaxdetox.sampling import generate
        except ImportError as e:
            raise NotImplementedError(
                f"LanguageModel.generate needs jaxdetox.sampling.generate ({e})"
            ) from e
        return generate(self, tokens, **kwargs)

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"LanguageModel({cfg.model_type}, layers={cfg.num_layers}, d={cfg.hidden_size}, "
            f"vocab={cfg.vocab_size}, dtype={cfg.dtype}, mesh={dict(self.mesh.shape) if self.mesh else None})"
        )
