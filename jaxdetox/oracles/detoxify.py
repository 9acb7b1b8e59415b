"""Detoxify (Unitary AI) adapter, usable only when its checkpoint is already on disk.

The `detoxify` package downloads its checkpoint on first use through `torch.hub`; offline we
accept an explicit `checkpoint=` path or a file already in torch hub's checkpoint cache, and
fail with a clear message otherwise instead of attempting a download. Its transformers
config/tokenizer must also be local (`huggingface_config_path=` a directory, or the HF cache).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

import numpy as np

from jaxdetox.oracles.base import BatchOracle, OracleUnavailableError, update_digest

# File names of the released checkpoints (torch hub caches them under these names).
CHECKPOINT_FILES = {
    "original": "toxic_original-c1212f89.ckpt",
    "unbiased": "toxic_debiased-c7548aa0.ckpt",
    "multilingual": "multilingual_debiased-0b549669.ckpt",
    "original-small": "original-albert-0e1d6498.ckpt",
    "unbiased-small": "unbiased-albert-c8519128.ckpt",
}


def find_checkpoint(model_type: str, checkpoint: str | os.PathLike | None) -> Path:
    """The local checkpoint for `model_type`: the explicit path, else torch hub's cache."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise OracleUnavailableError(f"detoxify oracle: checkpoint {path} does not exist")
        return path
    if model_type not in CHECKPOINT_FILES:
        raise ValueError(
            f"detoxify oracle: unknown model_type {model_type!r}; "
            f"one of {sorted(CHECKPOINT_FILES)} or pass checkpoint="
        )
    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / CHECKPOINT_FILES[model_type]
    if not path.is_file():
        raise OracleUnavailableError(
            f"detoxify oracle: weights for {model_type!r} are not on this machine (looked for "
            f"{path}); download {CHECKPOINT_FILES[model_type]} elsewhere and pass "
            "checkpoint=PATH (jaxdetox never downloads at run time)"
        )
    return path


class DetoxifyOracle(BatchOracle):
    """`Detoxify(model_type).predict(texts)["toxicity"]` from a local checkpoint."""

    batch_size = 32

    def __init__(
        self,
        model_type: str = "original",
        *,
        checkpoint: str | os.PathLike | None = None,
        huggingface_config_path: str | os.PathLike | None = None,
        device: str = "cpu",
        batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size)
        try:
            from detoxify import Detoxify
        except ImportError as err:
            raise OracleUnavailableError(
                f"detoxify oracle needs the 'detoxify' package (pip install detoxify): {err}"
            ) from err
        path = find_checkpoint(model_type, checkpoint)
        kwargs = {"checkpoint": str(path), "device": device}
        if huggingface_config_path is not None:
            kwargs["huggingface_config_path"] = str(huggingface_config_path)
        try:
            self._model = Detoxify(model_type, **kwargs)
        except OSError as err:  # transformers' "can't load config/tokenizer" is an OSError
            raise OracleUnavailableError(
                "detoxify oracle: its transformers config/tokenizer is not available offline; "
                f"pass huggingface_config_path=DIR ({err})"
            ) from err
        digest = hashlib.sha256()
        update_digest(digest, path)
        try:
            version = importlib.metadata.version("detoxify")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        self.oracle_id = f"detoxify/{model_type}@{digest.hexdigest()[:16]}/detoxify=={version}"

    def _score_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        prob = np.asarray(self._model.predict(texts)["toxicity"], np.float32).reshape(-1)
        return prob, np.ones(len(texts), bool)
