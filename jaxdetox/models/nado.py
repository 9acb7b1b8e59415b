"""The NADO auxiliary model R_φ (docs/method.md): `σ(h_φ(x, y_<t)[v]) = R(x, y_<t∘v)`.

Two variants, as in the authors' code:

- `separate`: its own causal transformer of the LM's family with `num_layers` layers
  (random, or a copy of the LM's embedding + first `num_layers` layers + final norm), then
  the head. It has its own KV cache (`init_cache`) for guided decoding.
- `shared`: only the head, applied to the LM's own final hidden states (pass them as
  `lm_hidden_btd`; `jax.lax.stop_gradient` them when the LM is frozen, the caller decides).

Two heads (`NadoConfig.head`, docs/method.md "NADO heads"); each is a feature map `f(h_t)`
plus a `[V, D']` unembedding `(w_vd, b_v)`, so that `h_φ = f(h_t)·w_vdᵀ + b_v` and every
consumer (chunked losses, fused loss, samplers) uses `hidden_states()` + `unembed_weights()`
the same way for the LM and for the NADO:

- `linear` (the authors'): `f = h`, `w` a free `[V, D]` matrix, zero-initialised by default
  (every logit 0, `R = 0.5`). Trained through the BCE of the *sampled* token only, so a row
  whose token never occurs in the samples keeps its initial value.
- `factored`: `h_φ[v] = V(h_t) + E_v·(W h_t + u) + b_v` with `E` the LM's frozen output
  embedding, `W` (full `D×D`, or rank `r`) and `u` zero-initialised, a value term
  `V(h_t) = a·h_t` shared by every token, and a per-token bias `b_v` (a sparse residual: only
  sampled tokens move it). A label on one token moves every token whose embedding is near it.
  Stored as `f = [W h + u ; a·h]` against the frozen `[E | 1]` (`head.embedding`, `[V, D+1]`).

Either starts neutral: with its trainable matrices at zero every `R` equals `σ(b)`, and a
uniform `b` cancels in the guided softmax (q = reference). `with_uniform_bias` sets `b` to
`logit(mean label)` so the untouched rows sit at the base rate instead of at 0.5.

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
HEADS = ("linear", "factored")
HEAD_INITS = ("zeros", "normal")  # the linear head's weight
# Parameters no optimizer may train (the factored head's copy of the LM's output embedding).
FROZEN_PARAMS = (r"^head\.embedding$",)
CONFIG_FILE = "nado_config.json"
WEIGHTS_FILE = "nado.safetensors"


@dataclasses.dataclass(frozen=True)
class NadoConfig:
    """Which NADO: variant, body architecture (`body.num_layers` = n), head init."""

    variant: str
    body: ModelConfig  # separate: the body's config; shared: the LM's config (d, |V|, dtypes)
    head_init: str = "zeros"  # linear head's weight: "zeros" (R = 0.5 at start) or "normal"
    head: str = "linear"  # "linear" | "factored" (module docstring)
    head_rank: int = 0  # factored: rank of W (0 = full D×D)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"NadoConfig.variant = {self.variant!r}; expected one of {VARIANTS}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(
                f"NadoConfig.head_init = {self.head_init!r}; expected one of {HEAD_INITS}"
            )
        if self.head not in HEADS:
            raise ValueError(f"NadoConfig.head = {self.head!r}; expected one of {HEADS}")
        if not 0 <= self.head_rank <= self.body.hidden_size:
            raise ValueError(
                f"NadoConfig.head_rank = {self.head_rank}; expected 0 (full) to "
                f"{self.body.hidden_size} (the hidden size)"
            )

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

    @classmethod
    def from_section(cls, lm_config: ModelConfig, section: Any) -> NadoConfig:
        """The NADO of a run config's `nado:` section (variant, num_layers, head, head_rank,
        head_init) for an LM: the one translation the run and the memory planner share."""
        return cls.for_lm(
            lm_config, section.variant, num_layers=section.num_layers,
            head_init=section.head_init, head=section.head, head_rank=section.head_rank,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict (inverse of `from_json`)."""
        body = dataclasses.asdict(self.body)
        if isinstance(body["eos_token_id"], tuple):
            body["eos_token_id"] = list(body["eos_token_id"])
        return {
            "variant": self.variant,
            "head_init": self.head_init,
            "head": self.head,
            "head_rank": self.head_rank,
            "body": body,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NadoConfig:
        """Rebuild from `to_json()` output (NADOs saved before heads existed are `linear`)."""
        return cls(
            data["variant"],
            ModelConfig(**data["body"]),
            data.get("head_init", "zeros"),
            data.get("head", "linear"),
            int(data.get("head_rank", 0)),
        )


class NadoHead(nnx.Module):
    """The `linear` head: `Linear(d -> |V|)` with bias; logits in float32."""

    def __init__(self, config: ModelConfig, init: str, *, rngs: nnx.Rngs):
        v, d = config.vocab_size, config.hidden_size
        self.w = param(rngs, (v, d), ("vocab", "embed"), config, init=init)
        self.b = param(rngs, (v,), ("vocab",), config, init="zeros")

    def features(self, h_btd: jax.Array) -> jax.Array:
        """What the unembedding reads: the hidden states themselves."""
        return h_btd

    def weights(self) -> tuple[jax.Array, jax.Array]:
        """`(w_vd, b_v)`."""
        return self.w[...], self.b[...]

    def __call__(self, h_btd: jax.Array) -> jax.Array:
        """Float32 logits `[B, T, V]` (the weight in the activations' dtype, as the LM head)."""
        return _logits(self, h_btd)


class FactoredHead(nnx.Module):
    """The `factored` head: `h_φ[v] = a·h + E_v·(W h + u) + b_v`, `E` frozen (module doc)."""

    def __init__(self, config: ModelConfig, rank: int, *, rngs: nnx.Rngs):
        v, d = config.vocab_size, config.hidden_size
        # [E | 1]: the LM's output embedding and the value term's column; never trained.
        self.embedding = param(rngs, (v, d + 1), ("vocab", None), config, init="zeros")
        if rank:  # W = up · down, `up` zero: W = 0 at the start, yet both factors get gradients
            self.down = param(rngs, (rank, d), (None, "embed"), config, init="normal")
            self.up = param(rngs, (d, rank), ("embed", None), config, init="zeros")
        else:
            self.proj = param(rngs, (d, d), ("embed", None), config, init="zeros")
        self.shift = param(rngs, (d,), ("embed",), config, init="zeros")
        self.value = param(rngs, (d,), ("embed",), config, init="zeros")
        self.b = param(rngs, (v,), ("vocab",), config, init="zeros")

    def features(self, h_btd: jax.Array) -> jax.Array:
        """`[W h + u ; a·h]`, `[B, T, D + 1]` in the activations' dtype."""
        dt = h_btd.dtype
        if hasattr(self, "proj"):
            wh = jnp.einsum("...i,oi->...o", h_btd, self.proj[...].astype(dt))
        else:
            low = jnp.einsum("...i,ri->...r", h_btd, self.down[...].astype(dt))
            wh = jnp.einsum("...r,or->...o", low, self.up[...].astype(dt))
        value = jnp.einsum("...i,i->...", h_btd, self.value[...].astype(dt))
        return jnp.concatenate([wh + self.shift[...].astype(dt), value[..., None]], axis=-1)

    def weights(self) -> tuple[jax.Array, jax.Array]:
        """`([E | 1], b_v)`; the embedding is a constant (stop-gradient)."""
        return jax.lax.stop_gradient(self.embedding[...]), self.b[...]

    def __call__(self, h_btd: jax.Array) -> jax.Array:
        """Float32 logits `[B, T, V]` of hidden states `[B, T, D]`."""
        return _logits(self, h_btd)


def _logits(head: nnx.Module, h_btd: jax.Array) -> jax.Array:
    f_btd = head.features(h_btd)
    w_vd, b_v = head.weights()
    return unembed(f_btd, w_vd.astype(f_btd.dtype), b_v)


class NadoModel(nnx.Module):
    """R_φ: same call convention as the LMs, plus `lm_hidden_btd` for the shared variant."""

    frozen_params = FROZEN_PARAMS  # `train.setup` never lets an optimizer train these

    def __init__(self, config: NadoConfig, *, rngs: nnx.Rngs):
        self.config = config
        if config.variant == "separate":
            self.body = family_module(config.body).MODEL_CLASS(config.body, rngs=rngs)
        if config.head == "factored":
            self.head = FactoredHead(config.body, config.head_rank, rngs=rngs)
        else:
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
        """What the head's unembedding reads, `[B, T, D']`, and the updated cache: the head's
        feature map of the body's (shared: the LM's) final hidden states."""
        if self.config.variant == "shared":
            if lm_hidden_btd is None:
                raise ValueError(
                    "shared-backbone NADO needs lm_hidden_btd (the LM's final hidden states)"
                )
            return self.head.features(lm_hidden_btd), cache
        h_btd, cache = self.body.hidden_states(
            tokens_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt, cache=cache
        )
        return self.head.features(h_btd), cache

    def unembed_weights(self) -> tuple[jax.Array, jax.Array]:
        """`(w_vd, bias_v)` of the head: NADO logits are `f @ w_vd.T + bias_v` (float32), `f`
        from `hidden_states`."""
        return self.head.weights()

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
        w_vd, b_v = self.unembed_weights()
        logits_btv = unembed(h_btd, w_vd.astype(h_btd.dtype), b_v)
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
    output_embedding: Any = None,
    mesh: Mesh | None = None,
) -> NadoModel:
    """A new NADO: body random (seed) or copied from `lm_model`'s first layers; head per config.

    The factored head copies the LM's output embedding `[V, D]`: `output_embedding`, else
    `lm_model`'s unembedding.
    """
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
    values["head.b"] = np.zeros((v,), np.float32)
    if config.head == "linear":
        w = rng.standard_normal((v, d), np.float32) * config.body.initializer_range
        values["head.w"] = w if config.head_init == "normal" else np.zeros((v, d), np.float32)
        return _assemble(config, values, mesh, "init_nado")
    if output_embedding is None and lm_model is not None:
        output_embedding = lm_model.unembed_weights()[0]
    if output_embedding is None:
        raise ValueError("init_nado: the factored head needs the LM's output embedding")
    e = np.asarray(output_embedding, np.float32)
    if e.shape != (v, d):
        raise ValueError(f"init_nado: output embedding has shape {e.shape}, expected {(v, d)}")
    values["head.embedding"] = np.concatenate([e, np.ones((v, 1), np.float32)], axis=1)
    if config.head_rank:
        r = config.head_rank
        values["head.down"] = rng.standard_normal((r, d), np.float32) / np.sqrt(d)
        values["head.up"] = np.zeros((d, r), np.float32)
    else:
        values["head.proj"] = np.zeros((d, d), np.float32)
    values["head.shift"] = np.zeros((d,), np.float32)
    values["head.value"] = np.zeros((d,), np.float32)
    return _assemble(config, values, mesh, "init_nado")


def with_uniform_bias(params: Any, rate: float) -> Any:
    """NADO params whose head bias is `logit(rate)` for every token (the neutral start at the
    base rate: untouched rows predict `R = rate`); `rate` is clipped to [1e-3, 1 − 1e-3]."""
    rate = float(np.clip(rate, 1e-3, 1 - 1e-3))
    logit = float(np.log(rate) - np.log1p(-rate))
    head = dict(params["head"])
    head["b"] = jnp.full_like(head["b"], logit)
    return {**params, "head": head}


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
