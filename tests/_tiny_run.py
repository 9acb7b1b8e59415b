"""The tiny random Llama saved as an HF checkpoint + a run config small enough for the suite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from tests._tiny import tiny_llama


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Write `tests._tiny.tiny_llama` (with its tokenizer) as an HF checkpoint dir."""
    tiny_llama(seed).save_pretrained(directory)
    return directory


def tiny_config(model_dir: Path, **sections: dict) -> dict:
    """A run config dict for the tiny model (sections override the defaults given here)."""
    config = {
        "name": "tiny-test",
        "model": {"path": str(model_dir)},
        "nado": {"num_layers": 1},
        "prompts": {"block_size": 8, "kind": "toxic", "max_tokens": 12},
        "sampling": {"num_samples": 2, "max_new_tokens": 6, "batch_size": 8},
        "train_nado": {"batch_size": 8, "epochs": 2, "optimizer": {"learning_rate": 1e-3}},
        "finetune": {"batch_size": 8, "epochs": 2, "optimizer": {"learning_rate": 1e-3}},
        "loop": {"iterations": 2, "checkpoint_every": 2},
        "eval": {"num_samples": 2, "max_prompts": 6, "max_new_tokens": 6, "text_seq_len": 32},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def write_config(path: Path, config: dict) -> Path:
    """Write a config dict as YAML."""
    path.write_text(yaml.safe_dump(config))
    return path


def final_weights(out: Path) -> dict[str, np.ndarray]:
    """A finished run's exported LLM and NADO weights (`lm/<name>`, `nado/<name>`)."""
    from safetensors.numpy import load_file

    lm = load_file(out / "final" / "model" / "model.safetensors")
    nado = load_file(out / "final" / "nado" / "nado.safetensors")
    return {**{f"lm/{k}": v for k, v in lm.items()}, **{f"nado/{k}": v for k, v in nado.items()}}
