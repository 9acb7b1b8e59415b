"""Hugging Face interop: config.json + safetensors in, the same out, exactly.

Import builds the model abstractly (`nnx.eval_shape`: no random init of full weights), then
reads one HF tensor at a time, converts it to our layout on the host in the target dtype,
stacks per-layer tensors into the `[L, ...]` parameter, and `device_put`s that parameter
straight to its sharding. Peak host memory is one stacked parameter, never the model.

Each family module (`llama.py`, `gpt2.py`) lists its `TensorMap`s: HF name (with `{i}` for
the layer), HF shape, our parameter path(s) and the two layout conversions. Conversions
are reshapes/transposes/splits only, so HF -> ours -> HF is bit-identical.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxdetox import sharding
from jaxdetox.errors import JaxdetoxError
from jaxdetox.models.config import ModelConfig
from jaxdetox.models.registry import abstract_model, family_module

log = logging.getLogger(__name__)

# Buffers some checkpoints carry that are not parameters (recomputed from the config).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class CheckpointError(JaxdetoxError, ValueError):
    """A checkpoint file or tensor is missing, unreadable or has the wrong shape."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor <-> one or more of our parameters (`{i}` in `hf_name`: per layer)."""

    hf_name: str
    hf_shape: tuple[int, ...]
    ours: tuple[str, ...]  # dotted paths in the model state, e.g. "layers.attn.wq"
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]

    @property
    def per_layer(self) -> bool:
        """Whether this map repeats for every layer (ours then has a leading `layers` axis)."""
        return "{i}" in self.hf_name


def identity_map(hf_name: str, shape: tuple[int, ...], ours: str) -> TensorMap:
    """A tensor stored in the same layout on both sides."""
    return TensorMap(hf_name, shape, (ours,), lambda w: (w,), lambda w: w)


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


# ----------------------------------------------------------------------------- reading


class SafetensorsCheckpoint:
    """Tensor names -> files of a local HF checkpoint dir (single file, or sharded + index)."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"{index}: corrupt index (expected JSON with a 'weight_map' object): {e}"
                ) from e
            for file in sorted(set(weight_map.values())):
                if not (self.dir / file).exists():
                    raise CheckpointError(f"{index}: lists shard {file!r}, which does not exist")
            self.file_of: dict[str, str] = dict(weight_map)
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                present = sorted(p.name for p in self.dir.iterdir())
                raise CheckpointError(
                    f"{self.dir}: no model.safetensors or model.safetensors.index.json found "
                    f"(expected HF safetensors weights; directory has {present})"
                )
            self.file_of = {}
            for file in files:
                for name in self._open(file).keys():
                    self.file_of[name] = file

    def _open(self, file: str) -> Any:
        from safetensors import SafetensorError, safe_open

        path = self.dir / file
        try:
            return safe_open(str(path), framework="numpy")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e

    def names(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return list(self.file_of)

    def locate(self, name: str) -> str:
        """The file holding tensor `name` (for error messages)."""
        return str(self.dir / self.file_of.get(name, "?"))

    def get(self, name: str) -> np.ndarray:
        """Read one tensor as a numpy array (bf16 via ml_dtypes)."""
        if name not in self.file_of:
            raise CheckpointError(f"{self.dir}: tensor {name!r} not found in the checkpoint")
        from safetensors import SafetensorError

        try:
            return self._open(self.file_of[name]).get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.locate(name)}: cannot read tensor {name!r}: {e}") from e


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse `config.json` of a checkpoint dir with errors naming the file."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing (expected an HF config.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def resolve_checkpoint(path_or_hub_id: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local directory as is; anything else is an HF Hub repo id fetched by snapshot_download."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_hub_id).count("/") > 1:
        raise CheckpointError(f"{path}: not a checkpoint directory")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        local = snapshot_download(str(path_or_hub_id), revision=revision, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, auth, network: all mean "cannot get it"
        raise CheckpointError(
            f"{path_or_hub_id!r}: not a local directory, and fetching it from the HF Hub "
            f"failed ({type(e).__name__}: {e})"
        ) from e
    return Path(local)


# ----------------------------------------------------------------------------- import


def from_hf_tensors(
    hf_config: dict[str, Any],
    get_tensor: Callable[[str], np.ndarray],
    names: Iterable[str],
    *,
    mesh: Mesh | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    locate: Callable[[str], str] | None = None,
) -> nnx.Module:
    """Build our model from HF-named tensors (any source: safetensors, GGUF, a dict)."""
    config = ModelConfig.from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
    available = set(names)
    locate = locate or (lambda name: "checkpoint")
    graphdef, abs_state = nnx.split(abstract_model(config))
    variables = {_dotted(p): v for p, v in nnx.to_flat_state(abs_state)}

    def fetch(name: str) -> tuple[str, np.ndarray]:
        # Original OpenAI GPT-2 files name tensors without the "transformer." prefix.
        for candidate in (name, name.removeprefix("transformer.")):
            if candidate in available:
                return candidate, get_tensor(candidate)
        raise CheckpointError(
            f"{locate(name)}: missing tensor {name!r} required by config.json "
            f"(model_type={config.model_type!r}, tie_word_embeddings="
            f"{config.tie_word_embeddings})"
        )

    placed: dict[str, jax.Array] = {}
    used: set[str] = set()
    for tmap in family_module(config).hf_tensor_maps(config):
        layer_ids: list[int | None] = list(range(config.num_layers)) if tmap.per_layer else [None]
        stacked: list[np.ndarray] | None = None
        for i in layer_ids:
            name, tensor = fetch(tmap.hf_name.format(i=i))
            used.add(name)
            if tuple(tensor.shape) != tmap.hf_shape:
                raise CheckpointError(
                    f"{locate(name)}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tmap.hf_shape} from config.json"
                )
            parts = tmap.to_ours(tensor)
            if i is None:
                stacked = [np.asarray(part) for part in parts]
                continue
            if stacked is None:  # allocate [L, ...] once, in the target dtype
                stacked = [
                    np.empty((config.num_layers, *part.shape), variables[path].dtype)
                    for part, path in zip(parts, tmap.ours)
                ]
            for buf, part in zip(stacked, parts):
                buf[i] = part
        for path, value in zip(tmap.ours, stacked):
            var = variables[path]
            value = value.astype(var.dtype, copy=False)
            if value.shape != var.shape:  # a bug in a TensorMap, not in the checkpoint
                raise AssertionError(f"{path}: mapped shape {value.shape} != {var.shape}")
            placed[path] = sharding.place_variable(value, var, mesh)
    missing = set(variables) - set(placed)
    if missing:
        raise AssertionError(f"no HF tensor maps to parameters {sorted(missing)}")
    unused = [
        n
        for n in sorted(available - used)
        if not n.endswith(IGNORED_SUFFIXES) and not n == "lm_head.weight"
    ]
    if unused:
        log.warning("ignored %d checkpoint tensors not used by the model: %s", len(unused), unused)
    state = nnx.from_flat_state(
        [(p, v.replace(placed[_dotted(p)])) for p, v in nnx.to_flat_state(abs_state)]
    )
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- export


def to_hf_tensors(model: nnx.Module) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(hf_name, array)` for every HF tensor, one parameter on host at a time."""
    config: ModelConfig = model.config
    variables = {_dotted(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for tmap in family_module(config).hf_tensor_maps(config):
        host = [np.asarray(jax.device_get(variables[path][...])) for path in tmap.ours]
        if not tmap.per_layer:
            yield tmap.hf_name, np.ascontiguousarray(tmap.to_hf(*host))
            continue
        for i in range(config.num_layers):
            yield tmap.hf_name.format(i=i), np.ascontiguousarray(tmap.to_hf(*[a[i] for a in host]))


def save_pretrained(
    model: nnx.Module,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write config.json + safetensors (sharded with an index above `max_shard_bytes`); a
    model with LoRA adapters is written with the adapters merged into its weights."""
    from jaxdetox.models.lora import merged_model

    model = merged_model(model)
    config: ModelConfig = model.config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_hf(), indent=2, sort_keys=True) + "\n")
    write_safetensors(out, to_hf_tensors(model), max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def write_safetensors(
    out: Path, named_tensors: Iterable[tuple[str, np.ndarray]], *, max_shard_bytes: int
) -> None:
    """Write HF-named tensors as `model.safetensors`, or shards + index above `max_shard_bytes`."""
    from safetensors.numpy import save_file

    # Stream: a shard is written as soon as it is full, so host memory holds one shard.
    meta = {"format": "pt"}
    written: list[tuple[Path, list[str]]] = []
    pending: dict[str, np.ndarray] = {}
    total = 0

    def flush() -> None:
        tmp = out / f"model-part{len(written):05d}.safetensors.tmp"
        save_file(pending, str(tmp), metadata=meta)
        written.append((tmp, list(pending)))
        pending.clear()

    for name, tensor in named_tensors:
        if pending and sum(t.nbytes for t in pending.values()) + tensor.nbytes > max_shard_bytes:
            flush()
        pending[name] = tensor
        total += tensor.nbytes
    flush()
    if len(written) == 1:
        written[0][0].replace(out / "model.safetensors")
    else:
        weight_map = {}
        for k, (tmp, names) in enumerate(written):
            file = f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
            tmp.replace(out / file)
            weight_map.update({name: file for name in names})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
