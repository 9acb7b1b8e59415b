"""Start-up checks: what a run would fail on, found before it spends a minute.

`check_run(config, out)` runs before a run writes anything (its `config.yaml` included) and
is what `jaxdetox run --dry-run` adds to the plan: the output folder (a jaxdetox run
directory or new; the saved config of an existing run must match), the method, the model
(a GGUF's header and tensor table, an HF folder's config, weights' tensor names and shapes
and tokenizer; a hub id must be cached when offline), the mesh against the devices present
(and the `split` placement's role devices), the prompts and the corpus (present,
non-empty, parsed, enough prompts for every iteration's block), every oracle (name,
arguments, packages, files and credentials; no weights loaded, no network call) and the
evaluation's files. Each failure raises the project's error for it (`jaxdetox.errors`), whose
message names the field or file; the CLI prints it as one line.

Nothing here reads model weights beyond safetensors headers; the GGUF check reads the
file's metadata (a few seconds for the built-in model, once per process).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

from jaxdetox.config import ConfigError, RunConfig, check_method
from jaxdetox.models.config import UnsupportedConfigError
from jaxdetox.models.hf import CheckpointError

# A hub id: `name` or `owner/name` (what `resolve_checkpoint` would download).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_run(
    config: RunConfig,
    out: Any = None,
    *,
    overwrite: bool = False,
    role: str | None = None,
    executes: bool = True,
) -> list[str]:
    """Every start-up check of a run of `config` in `out` (None: checked elsewhere); returns
    one line per checked item for `--dry-run` to print. `executes=False` (`jaxdetox eval`):
    `method` is only a row label, and no training block is sampled."""
    notes = []
    if executes:
        check_method(config)
    if out is not None:
        notes.append(check_out_dir(config, out, overwrite=overwrite))
    notes.append(f"model: {check_model(config.model.path)}")
    notes.append(f"mesh: {check_mesh(config, role)}")
    notes.append(f"prompts: {check_prompts(config, train=executes)}")
    if config.corpus is not None:
        notes.append(f"corpus: {check_corpus(config.corpus)}")
    notes += [f"oracle {name}: ok" for name in check_oracles(config)]
    notes += check_eval(config)
    return notes


def check_out_dir(config: RunConfig, out: Any, *, overwrite: bool = False) -> str:
    """`out` is new, empty or a run directory; an existing run's saved config must equal
    `config` (the check the real run makes before it resumes)."""
    import yaml

    from jaxdetox.pipeline.rundir import CONFIG_FILE, check_out, config_diff

    check_out(out, overwrite=overwrite)
    saved = out / CONFIG_FILE
    if not saved.exists():
        return f"out {out}: new run"
    differences = config_diff(yaml.safe_load(saved.read_text()), config, out)
    if differences:
        raise ConfigError(differences)
    return f"out {out}: resumes the run there (same config)"


# ----------------------------------------------------------------------------- the model


def check_model(path: str, field: str = "model.path", *, tokenizer: bool = True) -> str:
    """What `path` (the value of `field`) names, once checked loadable (`CheckpointError`
    naming the field and the file); `tokenizer`: an HF folder must have tokenizer files."""
    from jaxdetox.models.gguf import default_model_path, is_gguf_source

    try:
        if is_gguf_source(path):
            gguf = default_model_path() if path == "default" else Path(path)
            return _check_gguf(str(gguf.resolve()), *_stamp(gguf))
        local = Path(path).expanduser()
        if local.exists() or not _HUB_ID.match(str(path)):
            if not local.exists():
                raise CheckpointError(f"{path}: no such file or folder")
            stamp = _stamp(local / "config.json")
            return _check_hf_dir(str(local.resolve()), *stamp, tokenizer=tokenizer)
        return _check_hub_id(str(path))
    except FileNotFoundError as e:
        if e.errno is not None:
            raise
        raise CheckpointError(f"{field}: cannot load: {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{field}: cannot load: {e}") from None
    except UnsupportedConfigError as e:
        raise CheckpointError(f"{field}: cannot load {path!r}: {e}") from None


def _stamp(path: Path) -> tuple[int, int]:
    """`(size, mtime)` of a file: the cache key of a check (a rewritten file is checked anew)."""
    try:
        st = path.stat()
    except OSError:
        return 0, 0
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _check_gguf(path: str, size: int, mtime: int) -> str:
    from jaxdetox.models.config import ModelConfig
    from jaxdetox.models.gguf import open_gguf

    ckpt = open_gguf(path)  # header, metadata, tensor table (bounds, names, completeness)
    config = ModelConfig.from_hf(ckpt.config)
    return f"{path}: GGUF, {config.family}, {config.num_layers} layers, {size / 2**20:.0f} MiB"


@functools.lru_cache(maxsize=16)
def _check_hf_dir(path: str, size: int, mtime: int, *, tokenizer: bool) -> str:
    from safetensors import safe_open

    from jaxdetox.models.config import ModelConfig
    from jaxdetox.models.hf import TOKENIZER_FILES, SafetensorsCheckpoint, read_config
    from jaxdetox.models.registry import family_module

    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(
            f"{path}: not a checkpoint folder or a .gguf file (expected an HF folder with "
            "config.json and safetensors weights)"
        )
    config = ModelConfig.from_hf(read_config(directory))
    ckpt = SafetensorsCheckpoint(directory)
    names = set(ckpt.names())
    for tmap in family_module(config).hf_tensor_maps(config):
        layers = range(config.num_layers) if tmap.per_layer else [None]
        for i in layers:
            name = tmap.hf_name.format(i=i)
            found = name if name in names else name.removeprefix("transformer.")
            if found not in names:
                raise CheckpointError(
                    f"{directory}: no tensor {name!r} in the weights (config.json describes a "
                    f"{config.model_type} with {config.num_layers} layers)"
                )
            with safe_open(ckpt.locate(found), framework="numpy") as f:
                shape = tuple(f.get_slice(found).get_shape())
            if shape != tmap.hf_shape:
                raise CheckpointError(
                    f"{ckpt.locate(found)}: tensor {found!r} has shape {shape}, expected "
                    f"{tmap.hf_shape} from config.json"
                )
    if tokenizer and not any((directory / f).exists() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); a run needs one"
        )
    return f"{path}: HF checkpoint, {config.family}, {config.num_layers} layers"


def _check_hub_id(hub_id: str) -> str:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(hub_id, "config.json")
    if isinstance(cached, str):
        return f"{hub_id}: HF Hub model, in the local cache"
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise CheckpointError(
            f"{hub_id!r}: not a local path, and not in the HF cache while HF_HUB_OFFLINE is "
            "set; download it first (huggingface-cli download) or give a local folder"
        )
    return f"{hub_id}: HF Hub model, downloaded at start"


# ----------------------------------------------------------------------------- devices


def check_mesh(config: RunConfig, role: str | None = None) -> str:
    """The configured mesh (each role's, with `split`) fits the devices present."""
    import jax

    from jaxdetox.pipeline.context import mesh_for

    try:
        if config.loop.placement == "split":
            from jaxdetox.pipeline.placement import role_devices

            meshes = {r: mesh_for(config, d) for r, d in role_devices(config).items()}
            return ", ".join(f"{r} {dict(m.shape)}" for r, m in meshes.items())
        mesh = mesh_for(config)
    except ValueError as e:
        raise ConfigError(
            f"mesh: {e} ({jax.devices()[0].platform} devices here); fit mesh.data / "
            "mesh.fsdp / mesh.tensor to them (one of them -1 takes the rest)"
        ) from None
    return f"{dict(mesh.shape)} on {mesh.size} {jax.devices()[0].platform} devices"


# ----------------------------------------------------------------------------- data


def _field_error(field: str, error: Exception) -> Exception:
    """`error` with its message prefixed by the config field that named the data."""
    from jaxdetox.data import DataError

    if isinstance(error, DataError):
        return type(error)(f"{field}: {error}")
    return DataError(f"{field}: {error}")


def check_prompts(config: RunConfig, *, train: bool = True) -> str:
    """The prompt source exists, parses, and (`train`) has a block for every iteration that
    samples."""
    from jaxdetox.data import DataError

    try:
        return _check_prompts(config, train)
    except (DataError, FileNotFoundError) as e:
        if isinstance(e, FileNotFoundError) and e.errno is not None:
            raise
        raise _field_error("prompts.source", e) from None


def _check_prompts(config: RunConfig, train: bool) -> str:
    from jaxdetox.pipeline.prompts import prompt_blocks

    p = config.prompts
    # `kind` selects among the built-in prompts only (the run ignores it for a file too)
    if p.source == "builtin" and p.kind not in (None, "toxic", "neutral"):
        raise ConfigError(f"prompts.kind: {p.kind!r}; expected toxic, neutral or null (all)")
    blocks = prompt_blocks(p)[0]
    samples = train and _samples(config.method)
    needed = config.loop.iterations if samples else 0
    if needed > blocks.num_train_blocks:
        blocks.train_block(needed - 1)  # raises, naming the numbers and the fix
    total = len(blocks.ordered)
    return f"{p.source}: {total} prompts, {blocks.num_train_blocks} blocks of {p.block_size}"


def check_corpus(corpus: Any) -> str:
    """The corpus source opens, is non-empty, and its first record has the text field(s)."""
    from jaxdetox.data import DataError
    from jaxdetox.data.readers import check_fields, open_source

    if corpus.source == "builtin":
        return "builtin: the built-in training prompts' texts"
    try:
        source = open_source(corpus.source, split=corpus.split, data_dir=corpus.data_dir)
        fields = [corpus.text_field] + ([corpus.prompt_field] if corpus.prompt_field else [])
        check_fields(source, fields)
    except (DataError, FileNotFoundError) as e:
        if isinstance(e, FileNotFoundError) and e.errno is not None:
            raise
        raise _field_error("corpus.source", e) from None
    return f"{corpus.source}: {len(source)} records"


def check_oracles(config: RunConfig) -> list[str]:
    """Every oracle of the run can be built here (`oracles.check`); returns their names."""
    from jaxdetox import oracles

    sections = [("oracle", config.oracle)] + [
        (f"constraints.{i}.oracle", c.oracle) for i, c in enumerate(config.constraints)
    ]
    for where, section in sections:
        try:
            oracles.check(section.name, **section.args)
        except oracles.OracleError as e:
            raise type(e)(f"{where}: {e}") from None
    return [section.name for _, section in sections]


def check_eval(config: RunConfig) -> list[str]:
    """The evaluation's own files: the fluency model, the detection data, lm-eval tasks."""
    e = config.eval
    if not e.enabled:
        return []
    notes = []
    if e.fluency_model not in ("base", "none"):
        notes.append(f"eval.fluency_model: {check_model(e.fluency_model, 'eval.fluency_model')}")
    files = []
    if e.detection is not None:
        files += [("eval.detection.path", e.detection.path)]
        files += [("eval.detection.shots_path", e.detection.shots_path)]
    if e.lm_eval is not None:
        files += [("eval.lm_eval.include_path", e.lm_eval.include_path)]
    for field, path in files:
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{field}: {path}: no such file or folder")
    return notes


def _samples(method: str) -> bool:
    """Whether `method` samples training prompts (the registry's `samples`)."""
    from jaxdetox.methods import method_of

    return method_of(method).samples
