"""`--dry-run`: validate a config and show what a run would do, computing nothing.

The model's architecture comes from its config file (HF `config.json` or GGUF metadata;
no weights are read); every parameter tree is built abstractly (`nnx.eval_shape`), and the
per-device bytes come from the logical-axis rules applied to the configured mesh shape, so
a pod-sized config can be planned on a laptop.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxdetox import sharding
from jaxdetox.config import RunConfig
from jaxdetox.models.config import ModelConfig


def model_config_of(path: str) -> ModelConfig:
    """The `ModelConfig` of a model path (HF dir, .gguf, 'default') without loading weights."""
    from jaxdetox.models.gguf import default_model_path, is_gguf_source, open_gguf
    from jaxdetox.models.hf import read_config, resolve_checkpoint

    if is_gguf_source(path):
        gguf_path = default_model_path() if path == "default" else Path(path)
        return ModelConfig.from_hf(open_gguf(gguf_path).config)
    return ModelConfig.from_hf(read_config(resolve_checkpoint(path)))


class _MeshShape:
    """Just the axis sizes of a mesh (what the rules table needs), no devices."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.shape = sizes


def mesh_sizes(config: RunConfig, num_devices: int | None = None) -> dict[str, int]:
    """Axis sizes of the configured mesh (-1 filled from `num_devices`, default: local)."""
    dims = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    if -1 in dims:
        n = num_devices or jax.device_count()
        known = math.prod(d for d in dims if d != -1)
        dims[dims.index(-1)] = max(n // known, 1)
    return dict(zip(sharding.MESH_AXES, dims))


def per_device_bytes(
    abstract_state: nnx.State, sizes: dict[str, int], itemsize: int | None = None
) -> int:
    """Bytes one device holds of a model state under the rules table (largest shard)."""
    total = 0
    fake = _MeshShape(sizes)
    for _, var in nnx.to_flat_state(abstract_state):
        axes = sharding._var_axes(var)
        spec = sharding.logical_to_spec(axes, var.shape, fake)
        shard = 1
        for dim, entry in zip(var.shape, tuple(spec) + (None,) * len(var.shape)):
            names = () if entry is None else (entry,) if isinstance(entry, str) else entry
            shard *= dim // math.prod(sizes[a] for a in names)
        total += shard * (itemsize or np.dtype(var.dtype).itemsize)
    return total


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def plan(config: RunConfig, num_devices: int | None = None) -> str:
    """A human-readable plan: stages, mesh, and memory per device of every model state."""
    from jaxdetox.models import NadoConfig
    from jaxdetox.models.nado import NadoModel
    from jaxdetox.models.registry import abstract_model

    lm_config = model_config_of(config.model.path)
    lm_config = lm_config.replace(param_dtype=config.model.param_dtype, dtype=config.model.dtype)
    sizes = mesh_sizes(config, num_devices)
    lm_state = nnx.state(abstract_model(lm_config), nnx.Param)
    nado_config = NadoConfig.for_lm(
        lm_config, config.nado.variant, num_layers=config.nado.num_layers
    )
    nado_state = nnx.state(
        nnx.eval_shape(lambda: NadoModel(nado_config, rngs=nnx.Rngs(0))), nnx.Param
    )
    lm_n = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(lm_state))
    nado_n = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nado_state))
    ref_item = 2 if config.finetune.reference_dtype == "bfloat16" else None
    rows = [
        ("LLM params", per_device_bytes(lm_state, sizes)),
        ("LLM Adam moments (2 x fp32)", 2 * per_device_bytes(lm_state, sizes, 4)),
        ("reference LLM", per_device_bytes(lm_state, sizes, ref_item)),
        ("NADO params", per_device_bytes(nado_state, sizes)),
        ("NADO Adam moments (2 x fp32)", 2 * per_device_bytes(nado_state, sizes, 4)),
    ]
    lines = [
        f"run {config.name!r}: scheme {config.loop.scheme}, {config.loop.iterations} iterations",
        f"model {config.model.path}: {lm_config.family}, {lm_n / 1e6:.1f}M params, "
        f"{lm_config.num_layers} layers, d={lm_config.hidden_size}, V={lm_config.vocab_size}",
        f"NADO: {config.nado.variant}, {nado_n / 1e6:.1f}M params",
        f"mesh: {sizes} ({math.prod(sizes.values())} devices)",
        "",
        "per iteration i:",
        f"  sample     S_i: {config.prompts.block_size} prompts x {config.sampling.num_samples} "
        f"samples x {config.sampling.max_new_tokens} tokens from LLM_(i-1)",
        f"  label      S_i with oracle {config.oracle.name!r}",
        f"  train_nado NADO_i from NADO_(i-1): {config.train_nado.epochs} epochs, batch "
        f"{config.train_nado.batch_size}",
        f"  finetune   LLM_i from LLM_(i-1): λ={config.finetune.kl_weight}, α={config.finetune.alpha}, "
        f"KL on {config.finetune.kl_on}, {config.finetune.epochs} epochs, batch "
        f"{config.finetune.batch_size}" + (", + corpus NLL" if config.corpus else ""),
        "",
        "memory per device (every state at once, an upper bound; activations not included):",
    ]
    lines += [f"  {name:<30} {_gib(n)}" for name, n in rows]
    lines.append(f"  {'total (before activations)':<30} {_gib(sum(n for _, n in rows))}")
    return "\n".join(lines)


def describe_environment() -> dict[str, Any]:
    """Process / device facts printed at the start of a run."""
    return {
        "process": f"{jax.process_index()}/{jax.process_count()}",
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "platform": jax.devices()[0].platform,
        "pid": os.getpid(),
    }
