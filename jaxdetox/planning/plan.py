"""`--dry-run`: validate a config and show what a run would do, computing nothing.

The model's architecture comes from its config file (HF `config.json` or GGUF metadata;
no weights are read); every tree is built abstractly and the per-device bytes come from the
logical-axis rules applied to the configured mesh shape (`jaxdetox.planning.memory`), so a
pod-sized config can be planned on a laptop. `jaxdetox plan` prints the same plan and
suggests mesh shapes for a device kind.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import jax

from jaxdetox import sharding
from jaxdetox.config import ConfigError, RunConfig
from jaxdetox.models.config import ModelConfig


def model_config_of(path: str) -> ModelConfig:
    """The `ModelConfig` of a model path (HF dir, .gguf, 'default') without loading weights."""
    from jaxdetox.models.gguf import default_model_path, is_gguf_source
    from jaxdetox.models.hf import read_config, resolve_checkpoint

    if is_gguf_source(path):
        gguf_path = default_model_path() if path == "default" else Path(path)
        stat = gguf_path.stat()
        return gguf_model_config(str(gguf_path), stat.st_size, stat.st_mtime_ns)
    local = Path(path).expanduser().exists()
    bundled = None if local else bundled_architecture(str(path))
    if bundled is not None:  # a shipped experiment's hub model: no network needed
        return ModelConfig.from_hf(bundled)
    if not local and str(path).count("/") == 1:
        # A hub id: its config.json is all a plan needs (no weights downloaded).
        from huggingface_hub import hf_hub_download

        try:
            config_dir = Path(hf_hub_download(str(path), "config.json")).parent
        except Exception as e:  # offline, unknown repo, gated: name the cause
            raise ConfigError(f"model.path {path!r}: cannot fetch its config.json ({e})") from e
        return ModelConfig.from_hf(read_config(config_dir))
    return ModelConfig.from_hf(read_config(resolve_checkpoint(path)))


@functools.lru_cache(maxsize=16)
def gguf_model_config(path: str, size: int, mtime_ns: int) -> ModelConfig:
    """A GGUF file's `ModelConfig`, parsed once per file version (size and mtime key it):
    every dry-run of a folder of configs plans the same file."""
    from jaxdetox.models.gguf import open_gguf

    return ModelConfig.from_hf(open_gguf(path).config)


def bundled_architecture(hub_id: str) -> dict[str, Any] | None:
    """The HF config.json of a hub model the shipped experiments name (gpt2, gpt2-large,
    meta-llama/Llama-2-7b-hf; public architecture facts), kept in the package so their
    configs plan offline and without a download; else None."""
    from jaxdetox import assets

    try:
        path = assets.asset_path(f"architectures/{hub_id.replace('/', '--')}.json")
    except FileNotFoundError:
        return None
    return json.loads(path.read_text())


def mesh_sizes(config: RunConfig, num_devices: int | None = None) -> dict[str, int]:
    """Axis sizes of the configured mesh (-1 filled from `num_devices`, default: local)."""
    dims = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    if -1 in dims:
        n = num_devices or jax.device_count()
        known = math.prod(d for d in dims if d != -1)
        dims[dims.index(-1)] = max(n // known, 1)
    return dict(zip(sharding.MESH_AXES, dims))


def planner(config: RunConfig) -> Any:
    """A `memory.Planner` for the run's model (architecture from its config file only)."""
    from jaxdetox.planning.memory import Planner

    lm_config = model_config_of(config.model.path)
    prefix = 1 if lm_config.family == "llama" else 0  # BOS before each prompt
    return Planner(config, lm_config, prefix_tokens=prefix)


def plan(config: RunConfig, num_devices: int | None = None, device: str | None = None) -> str:
    """A human-readable plan: stages, mesh, and the memory per device of every stage
    (`jaxdetox.planning.memory`); `device` (a `DEVICE_KINDS` name, default: this machine's
    accelerator when known) adds whether the peak fits."""
    from jaxdetox.methods import method_of
    from jaxdetox.planning import memory

    p = planner(config)
    lm_config = p.lm_config
    sizes = mesh_sizes(config, num_devices)
    lm_n = sum(math.prod(x.shape) for x in jax.tree.leaves(p.lm_params))
    nado_n = sum(math.prod(x.shape) for x in jax.tree.leaves(p.nado_params))
    kind = memory.device_kind(device) if device else memory.local_device_kind()
    lines = [
        f"run {config.name!r}: method {config.method}, scheme {config.loop.scheme}, "
        f"{config.loop.iterations} iterations",
        f"model {config.model.path}: {lm_config.family}, {lm_n / 1e6:.1f}M params, "
        f"{lm_config.num_layers} layers, d={lm_config.hidden_size}, V={lm_config.vocab_size}",
        f"NADO: {config.nado.variant}, {nado_n / 1e6:.1f}M params"
        + (
            f", one per constraint: {config.oracle.name} + "
            + ", ".join(f"{c.name} ({c.oracle.name}, α={c.alpha})" for c in config.constraints)
            if config.constraints
            else ""
        ),
        f"mesh: {sizes} ({math.prod(sizes.values())} devices)",
        "",
        *method_of(config.method).describe(config),
        "",
        f"memory per device (stages run one after another; remat "
        f"{'on' if config.model.remat else 'off'}, params {config.model.param_dtype}, "
        f"compute {config.model.dtype}):",
        memory.format_plan(p.plan(sizes), kind),
    ]
    return "\n".join(lines)
