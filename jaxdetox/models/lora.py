"""LoRA adapters for the scanned causal LMs: `W' = W + (α/r)·A·B` on chosen layer kernels.

Why in-project rather than qwix (0.1.8, the Google JAX LoRA/quantisation library): qwix
adds LoRA by intercepting `dot_general` / `einsum` calls of a module while it runs and keeps
the adapters as variables of the intercepted module. Our models (a) run their layers under
`jax.lax.scan` over stacked weights, (b) are sampled through a decode form that reads
per-layer weight copies (`sampling/decode_form.py`) rather than calling the modules' own
matmuls, and (c) compute the vocabulary head inside the fused loss from `unembed_weights()`.
Interception would see the scanned block once, not the per-layer adapter slices, and the
decode form and the fused head would bypass it. Adapters as *parameters of the stacked
layers* fit all three: the scan slices them with the layer, and anything that needs plain
weights (sampler, export, evaluation) uses `merge_params`.

Layout. For a kernel `name` of the stacked layers with logical axes `(layers, *in, *out)`
(in = `embed` for `wq/wk/wv/gate/up/fc`, in = everything but the last axis for
`wo/down/proj`), LoRA adds `name_lora_a [L, *in, r]` (He-normal init) and
`name_lora_b [L, r, *out]` (zeros), both float32 (the trained master weights, whatever
the base's dtype): with B = 0 the adapted model *is* the base model,
bit for bit (`W + 0 = W`). The merge happens per layer inside the scan
(`CausalLM._scan_layers` calls `merge_layer`), so no second copy of the stacked weights is
ever formed while training (with `model.remat`, not even as backward residuals: without it
the backward keeps each layer's merged target kernels, one copy of those kernels).
`split_adapters` / `combine` move between the model's params
and (base, adapters): the training state keeps the frozen base once, as the reference
model, and trains only the adapters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

F32 = jnp.float32
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
ADAPTER_FILE, ADAPTER_CONFIG = "adapters.safetensors", "adapter_config.json"
# Kernels whose input is the first (non-layer) axis; the others take all but the last axis.
INPUT_FIRST = ("embed",)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank r, scale α (ΔW = (α/r)·A·B) and target kernels (names or regexes over the
    layer-relative path, e.g. `wq`, `attn/w[qv]`, `mlp/.*`)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("lora.targets is empty; name the layer kernels to adapt (e.g. wq)")

    @property
    def scale(self) -> float:
        """α / r."""
        return self.alpha / self.rank


def _is_adapter(name: str) -> bool:
    return name.endswith((SUFFIX_A, SUFFIX_B))


def _matches(path: str, targets: Sequence[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(name == t or re.fullmatch(t, path) for t in targets)


def _in_ndim(axes: tuple[str | None, ...]) -> int:
    """How many leading (non-layer) axes of a stacked kernel are its input."""
    return 1 if axes[1] in INPUT_FIRST else len(axes) - 2


def target_kernels(model: nnx.Module, config: LoraConfig) -> dict[str, nnx.Param]:
    """The stacked layer kernels (`attn/wq`, ...) that `config.targets` selects."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model.layers, nnx.Param)):
        key = "/".join(str(p) for p in path)
        axes = var.get_metadata().get("out_sharding") or ()
        if _is_adapter(key) or len(axes) < 3 or axes[0] != "layers":
            continue  # norms and biases are not adapted
        if _matches(key, config.targets):
            out[key] = var
    if not out:
        names = [
            "/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model.layers, nnx.Param))
        ]
        raise ValueError(f"lora.targets {list(config.targets)} match no layer kernel of {names}")
    return out


def add_adapters(model: nnx.Module, config: LoraConfig, seed: int = 0) -> nnx.Module:
    """Give `model` (a `CausalLM`) adapters on the target kernels, in place; B = 0."""
    if getattr(model, "lora_scale", None) is not None:
        raise ValueError("the model already has LoRA adapters")
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(sorted(target_kernels(model, config).items())):
        axes = tuple(var.get_metadata()["out_sharding"])
        shape, n_in = var.shape, _in_ndim(axes)
        in_shape, out_shape = shape[1 : 1 + n_in], shape[1 + n_in :]
        fan_in = math.prod(in_shape)
        a = jax.random.normal(jax.random.fold_in(key, i), (shape[0], *in_shape, config.rank), F32)
        # float32 adapters whatever the base's dtype (they are the trained master weights).
        a = a * math.sqrt(2.0 / fan_in)  # He-normal, as LoRA's A
        b = jnp.zeros((shape[0], config.rank, *out_shape), F32)
        *parents, name = path.split("/")
        owner = model.layers
        for p in parents:
            owner = getattr(owner, p)
        meta = {"eager_sharding": False}
        setattr(
            owner, name + SUFFIX_A, nnx.Param(a, out_sharding=(*axes[: 1 + n_in], None), **meta)
        )
        setattr(owner, name + SUFFIX_B, nnx.Param(b, out_sharding=(axes[0], None, *axes[1 + n_in :]), **meta))  # fmt: skip
    model.lora_scale = config.scale
    return model


def delta_weight(a: jax.Array, b: jax.Array, scale: float, stacked: bool = False) -> jax.Array:
    """ΔW = scale·A·B in float32 for one layer (A `[*in, r]`, B `[r, *out]`) or, `stacked`,
    for every layer (A `[L, *in, r]`, B `[L, r, *out]`)."""
    r = a.shape[-1]
    if stacked:
        lead = a.shape[0]
        a2 = a.astype(F32).reshape(lead, -1, r)
        b2 = b.astype(F32).reshape(lead, r, -1)
        d = jnp.einsum("lir,lro->lio", a2, b2)
        return scale * d.reshape(lead, *a.shape[1:-1], *b.shape[2:])
    d = a.astype(F32).reshape(-1, r) @ b.astype(F32).reshape(r, -1)
    return scale * d.reshape(*a.shape[:-1], *b.shape[1:])


def merge_layer(state: nnx.State, scale: float) -> nnx.State:
    """One scanned layer's state with each adapted kernel replaced by `W + (α/r)·A·B` (the
    adapters stay, unused by the block: the graph keeps its shape)."""
    flat = dict(nnx.to_flat_state(state))
    for path, var in list(flat.items()):
        name = str(path[-1])
        if not name.endswith(SUFFIX_A):
            continue
        base = path[:-1] + (name[: -len(SUFFIX_A)],)
        b = flat[path[:-1] + (name[: -len(SUFFIX_A)] + SUFFIX_B,)]
        w = flat[base]
        merged = w[...].astype(F32) + delta_weight(var[...], b[...], scale)
        flat[base] = w.replace(merged.astype(w.dtype))
    return nnx.from_flat_state(list(flat.items()))


def split_adapters(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(base, adapters)`: a LoRA model's pure-dict params cut into two disjoint trees."""

    def cut(tree: dict[str, Any], keep_adapters: bool) -> dict[str, Any]:
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                sub = cut(value, keep_adapters)
                if sub:
                    out[name] = sub
            elif _is_adapter(str(name)) == keep_adapters:
                out[name] = value
        return out

    return cut(params, False), cut(params, True)


def combine(base: dict[str, Any], adapters: dict[str, Any]) -> dict[str, Any]:
    """The LoRA model's params from `split_adapters`' two trees (no copies)."""
    out = dict(base)
    for name, value in adapters.items():
        out[name] = combine(out.get(name, {}), value) if isinstance(value, dict) else value
    return out


def merge_params(base: dict[str, Any], adapters: dict[str, Any], scale: float) -> dict[str, Any]:
    """Plain model params `W + (α/r)·A·B` (the base model's tree): for sampling and export."""

    def merge(tree: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = merge(value)
            elif not _is_adapter(str(name)):
                a, b = tree.get(name + SUFFIX_A), tree.get(name + SUFFIX_B)
                delta = None if a is None else delta_weight(a, b, scale, stacked=True)
                out[name] = (
                    value if delta is None else (value.astype(F32) + delta).astype(value.dtype)
                )
        return out

    return merge(combine(base, adapters))


# ----------------------------------------------------------------------------- files


def save_adapters(
    directory: str | os.PathLike, adapters: dict[str, Any], config: LoraConfig, base: str
) -> Path:
    """Write the adapters (`adapters.safetensors`) and `adapter_config.json` (rank, α,
    targets and `base`: the base model they apply to) into `directory`."""
    from safetensors.numpy import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(jax.device_get(x))
        for path, x in jax.tree_util.tree_flatten_with_path(adapters)[0]
    }
    save_file(flat, str(out / ADAPTER_FILE))
    meta = {**dataclasses.asdict(config), "base_model": base, "format": "jaxdetox-lora/1"}
    (out / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))
    return out


def load_adapters(directory: str | os.PathLike) -> tuple[dict[str, Any], LoraConfig, str]:
    """`(adapters as a nested dict of numpy arrays, LoraConfig, base model path)`."""
    from safetensors.numpy import load_file

    src = Path(directory)
    if not (src / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{src}: no {ADAPTER_CONFIG} (not a jaxdetox LoRA directory)")
    meta = json.loads((src / ADAPTER_CONFIG).read_text())
    config = LoraConfig(meta["rank"], meta["alpha"], tuple(meta["targets"]))
    tree: dict[str, Any] = {}
    for key, value in load_file(str(src / ADAPTER_FILE)).items():
        *parents, name = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = value
    return tree, config, meta["base_model"]


def merged_model(model: nnx.Module) -> nnx.Module:
    """The plain (adapter-free) model with `W + (α/r)·A·B` weights; `model` itself if it has
    no adapters. Used by `save_pretrained` (an HF checkpoint has no adapters)."""
    scale = getattr(model, "lora_scale", None)
    if scale is None:
        return model
    from jaxdetox.models.registry import abstract_model

    base, adapters = split_adapters(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    graph, abstract = nnx.split(abstract_model(model.config), nnx.Param)
    merged = merge_params(base, adapters, scale)
    nnx.replace_by_pure_dict(abstract, merged)
    return nnx.merge(graph, abstract)
