"""The NADO auxiliary model R_φ (docs/method.md): `σ(h_φ(x, y_<t)[v]) = R(x, y_<t∘v)`.

Two variants, as in the authors' code:

- `separate`: its own causal transformer of the LM's family with `num_layers` layers
  (random, or a copy of the LM's embedding + first `num_layers` layers + final norm), then
  the head. It has its own KV cache (`init_cache`) for guided decoding.
- `shared`: only the head, applied to the LM's own final hidden states (pass them as
  `lm_hidden_btd`; `jax.lax.stop_gradient` them when the LM is frozen, the caller decides).

The head is `Linear(d -> |V|)` with bias, zero-initialised by default: every logit is 0 and
`R = σ(0) = 0.5` everywhere at the start. Its weight is stored `[V, D]` like an unembedding,
so chunked losses use `unembed_weights()` the same way for the LM and for the NADO.

Saved on its own: `nado_config.json` + `nado.safetensors` (our parameter names), never
inside the LM's checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxdetox import sharding
from jaxdetox.models.cache import KVCache, init_cache
from jaxdetox.models.config import ModelConfig
from jaxdetox.models.hf import CheckpointError
from jaxdetox.models.layers import param, unembed
from jaxdetox.models.registry import abstract_model, build_model, family_module

VARIANTS = ("separate", "shared")
CONFIG_FILE = "nado_config.json"
WEIGHTS_FILE = "nado.safetensors"


@dataclasses.dataclass(frozen=True)
class NadoConfig:
    """Which NADO: variant, body architecture (`body.num_layers` = n), head init."""

    variant: str
    body: ModelConfig  # separate: the body's config; shared: the LM's config (d, |V|, dtypes)
    head_init: str = "zeros"  # "zeros" (R = 0.5 at start) or "normal"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"NadoConfig.variant = {self.variant!r}; expected one of {VARIANTS}")
        if self.head_init not in ("zeros", "normal"):
            raise ValueError(f"NadoConfig.head_init = {self.head_init!r}; expected zeros|normal")

    @classmethod
    def for_lm(
        cls,
        lm_config: ModelConfig,
        variant: str = "separate",
        num_layers: int | None = None,
        **kw: Any,
    ) -> NadoConfig:
        """NADO config matching an LM: same family, vocabulary, width and dtype policy."""
        if variant == "shared":
            return cls("shared", lm_config, **kw)
        n = lm_config.num_layers if num_layers is None else int(num_layers)
        if not 1 <= n:
            raise ValueError(f"NADO num_layers = {n}; expected >= 1")
        # Tied: the body's own vocabulary projection is never used, so store none.
        return cls("separate", lm_config.replace(num_layers=n, tie_word_embeddings=True), **kw)

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict (inverse of `from_json`)."""
        body = dataclasses.asdict(self.body)
        if isinstance(body["eos_token_id"], tuple):
            body["eos_token_id"] = list(body["eos_token_id"])
        return {"variant": self.variant, "head_init": self.head_init, "body": body}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NadoConfig:
        """Rebuild from `to_json()` output."""
        return cls(data["variant"], ModelConfig(**data["body"]), data.get("head_init", "zeros"))


class NadoHead(nnx.Module):
    """`Linear(d -> |V|)` with bias; logits in float32."""

    def __init__(self, config: ModelConfig, init: str, *, rngs: nnx.Rngs):
        v, d = config.vocab_size, config.hidden_size
        self.w = param(rngs, (v, d), ("vocab", "embed"), config, init=init)
        self.b = param(rngs, (v,), ("vocab",), config, init="zeros")

    def __call__(self, h_btd: jax.Array) -> jax.Array:
        """Float32 logits `[B, T, V]` (the weight in the activations' dtype, as the LM head)."""
        return unembed(h_btd, self.w[...].astype(h_btd.dtype), self.b[...])


class NadoModel(nnx.Module):
    """R_φ: same call convention as the LMs, plus `lm_hidden_btd` for the shared variant."""

    def __init__(self, config: NadoConfig, *, rngs: nnx.Rngs):
        self.config = config
        if config.variant == "separate":
            self.body = family_module(config.body).MODEL_CLASS(config.body, rngs=rngs)
        self.head = NadoHead(config.body, config.head_init, rngs=rngs)

    def hidden_states(
        self,
        tokens_bt: jax.Array,
        *,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        cache: KVCache | None = None,
        lm_hidden_btd: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Features the head reads `[B, T, D]` and the updated cache (shared: LM's hidden)."""
        if self.config.variant == "shared":
            if lm_hidden_btd is None:
                raise ValueError(
                    "shared-backbone NADO needs lm_hidden_btd (the LM's final hidden states)"
                )
            return lm_hidden_btd, cache
        return self.body.hidden_states(
            tokens_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt, cache=cache
        )

    def unembed_weights(self) -> tuple[jax.Array, jax.Array]:
        """`(w_vd, bias_v)` of the head: NADO logits are `h @ w_vd.T + bias_v` (float32)."""
        return self.head.w[...], self.head.b[...]

    def __call__(
        self,
        tokens_bt: jax.Array,
        *,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        cache: KVCache | None = None,
        lm_hidden_btd: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """NADO logits `h_φ` float32 `[B, T, V]` (R = sigmoid of them) and the updated cache."""
        h_btd, cache = self.hidden_states(
            tokens_bt,
            positions_bt=positions_bt,
            segment_ids_bt=segment_ids_bt,
            cache=cache,
            lm_hidden_btd=lm_hidden_btd,
        )
        logits_btv = self.head(h_btd)
        return sharding.constrain(logits_btv, ("batch", "length", "vocab")), cache

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache | None:
        """The body's empty KV cache (None for the shared variant, which has no body)."""
        if self.config.variant == "shared":
            return None
        return init_cache(self.config.body, batch, max_len, dtype)


def nado_logits(
    nado: NadoModel,
    tokens_bt: jax.Array,
    *,
    positions_bt: jax.Array | None = None,
    segment_ids_bt: jax.Array | None = None,
    cache: KVCache | None = None,
    lm_hidden_btd: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Functional spelling of `nado(...)`: float32 `h_φ` logits `[B, T, V]` and the cache."""
    return nado(
        tokens_bt,
        positions_bt=positions_bt,
        segment_ids_bt=segment_ids_bt,
        cache=cache,
        lm_hidden_btd=lm_hidden_btd,
    )


# ----------------------------------------------------------------------------- construction


def _abstract(config: NadoConfig) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: NadoModel(config, rngs=nnx.Rngs(0))))


def _assemble(
    config: NadoConfig, values: dict[str, np.ndarray], mesh: Mesh | None, source: str
) -> NadoModel:
    """Place host arrays (by dotted path) onto the mesh and merge into a NadoModel."""
    graphdef, abs_state = _abstract(config)
    flat = []
    for path, var in nnx.to_flat_state(abs_state):
        name = ".".join(str(p) for p in path)
        if name not in values:
            raise CheckpointError(f"{source}: missing tensor {name!r} (shape {var.shape})")
        value = np.asarray(values[name])
        if value.shape != var.shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {value.shape}, expected {var.shape}"
            )
        placed = sharding.place_variable(value.astype(var.dtype), var, mesh)
        flat.append((path, var.replace(placed)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def init_nado(
    config: NadoConfig,
    seed: int = 0,
    *,
    lm_model: nnx.Module | None = None,
    mesh: Mesh | None = None,
) -> NadoModel:
    """A new NADO: body random (seed) or copied from `lm_model`'s first layers; head per config."""
    head_init = config.head_init
    values: dict[str, np.ndarray] = {}
    if config.variant == "separate":
        if lm_model is None:
            body = build_model(config.body, seed)
        else:
            body = _body_from_lm(config.body, lm_model)
        for path, var in nnx.to_flat_state(nnx.state(body, nnx.Param)):
            values["body." + ".".join(str(p) for p in path)] = np.asarray(var[...])
    d, v = config.body.hidden_size, config.body.vocab_size
    rng = np.random.default_rng([seed, 1])
    w = rng.standard_normal((v, d), np.float32) * config.body.initializer_range
    values["head.w"] = w if head_init == "normal" else np.zeros((v, d), np.float32)
    values["head.b"] = np.zeros((v,), np.float32)
    return _assemble(config, values, mesh, "init_nado")


def _body_from_lm(body_config: ModelConfig, lm_model: nnx.Module) -> nnx.Module:
    """LM embedding(s), first n stacked layers and final norm, as a body of `body_config`."""
    lm_config: ModelConfig = lm_model.config
    n = body_config.num_layers
    if n > lm_config.num_layers or lm_config.family != body_config.family:
        raise ValueError(
            f"NADO body ({body_config.family}, {n} layers) cannot be initialised from an LM "
            f"({lm_config.family}, {lm_config.num_layers} layers)"
        )
    graphdef, abs_state = nnx.split(abstract_model(body_config))
    lm_params = {
        ".".join(str(p) for p in path): var[...]
        for path, var in nnx.to_flat_state(nnx.state(lm_model, nnx.Param))
    }
    flat = []
    for path, var in nnx.to_flat_state(abs_state):
        name = ".".join(str(p) for p in path)
        value = lm_params[name]
        if path[0] == "layers":
            value = value[:n]
        flat.append((path, var.replace(jnp.asarray(value, var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------- save / load


def save_nado(nado: NadoModel, out: str | os.PathLike[str]) -> Path:
    """Write `nado_config.json` + `nado.safetensors` into `out` (its own directory)."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(nado.config.to_json(), indent=2) + "\n")
    tensors = {
        ".".join(str(p) for p in path): np.ascontiguousarray(jax.device_get(var[...]))
        for path, var in nnx.to_flat_state(nnx.state(nado, nnx.Param))
    }
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "jaxdetox-nado"})
    return out


def load_nado(directory: str | os.PathLike[str], *, mesh: Mesh | None = None) -> NadoModel:
    """Load a NADO saved by `save_nado`, placing each tensor with its sharding on `mesh`."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    cfg_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (cfg_path, weights):
        if not path.exists():
            raise CheckpointError(f"{path}: missing (expected a NADO saved by save_nado)")
    try:
        config = NadoConfig.from_json(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: not a valid NADO config: {e}") from e
    try:
        with safe_open(str(weights), framework="numpy") as f:
            values = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file: {e}") from e
    return _assemble(config, values, mesh, str(weights))
