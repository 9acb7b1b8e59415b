"""Any Hugging Face sequence-classification checkpoint on disk as a toxicity oracle.

E.g. ToxiGen-RoBERTa (`tomh/toxigen_roberta`, the paper's LLaMA-pipeline oracle; notes §5)
whose `LABEL_1` is "toxic": hence the default `toxic_label=1`. Single-label heads give
`softmax(logits)[toxic_label]`; multi-label heads (`problem_type=multi_label_classification`,
e.g. Detoxify-style models) give `sigmoid(logits)[toxic_label]`.

Any other attribute: `label=` names the class whose probability is the violation score (same
as `toxic_label`), or `satisfied_label=` the class the text should have, scored
`1 − P(satisfied_label)` (e.g. a sentiment model with `satisfied_label: POSITIVE`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from jaxdetox.oracles.base import BatchOracle, OracleUnavailableError, check_texts, update_digest


def checkpoint_fingerprint(model_dir: Path) -> str:
    """Short sha256 over every file in the directory (config, weights, tokenizer): the version."""
    digest = hashlib.sha256()
    names = sorted(p.name for p in model_dir.iterdir() if p.is_file())
    for name in names:
        digest.update(name.encode())
        update_digest(digest, model_dir / name)
    return digest.hexdigest()[:16]


def label_index(config: object, label: int | str, path: Path) -> int:
    """Class index of `label` (an index, or a name in the config's `label2id`)."""
    n_labels = int(config.num_labels)
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    if isinstance(label, str) and not label.isdigit():
        if label not in label2id:
            raise ValueError(
                f"hf oracle: label {label!r} not in {path}/config.json label2id {sorted(label2id)}"
            )
        return label2id[label]
    if not 0 <= int(label) < n_labels:
        raise ValueError(f"hf oracle: label {label} outside [0, {n_labels})")
    return int(label)


def classifier_dir(model_dir: str | os.PathLike) -> Path:
    """`model_dir` as a path, if it holds a saved classifier (`OracleUnavailableError` if not)."""
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise OracleUnavailableError(
            f"hf oracle: {path} has no config.json; expected a local directory saved with "
            "save_pretrained (a classifier checkpoint plus its tokenizer files)"
        )
    return path


class HFClassifierOracle(BatchOracle):
    """transformers `AutoModelForSequenceClassification` + `AutoTokenizer` from a local dir."""

    batch_size = 32

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        toxic_label: int | str = 1,
        label: int | str | None = None,
        satisfied_label: int | str | None = None,
        activation: str | None = None,
        max_length: int = 512,
        batch_size: int | None = None,
        device: str = "cpu",
        num_threads: int | None = None,
    ) -> None:
        super().__init__(batch_size)
        path = classifier_dir(model_dir)
        try:
            import torch
            import transformers
        except ImportError as err:
            raise OracleUnavailableError(
                f"hf oracle needs torch and transformers (pip install 'jaxdetox[torch]'): {err}"
            ) from err
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self._torch = torch
        self._device = torch.device(device)
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True
        )
        self._model = model.to(self._device).eval()
        config = model.config
        if label is not None and satisfied_label is not None:
            raise ValueError("hf oracle: give `label` (violation) or `satisfied_label`, not both")
        self.satisfied = satisfied_label is not None
        chosen = satisfied_label if self.satisfied else (toxic_label if label is None else label)
        self.toxic_label = label_index(config, chosen, path)
        if activation is None:
            multi = (
                config.problem_type == "multi_label_classification" or int(config.num_labels) == 1
            )
            activation = "sigmoid" if multi else "softmax"
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"hf oracle: activation must be softmax|sigmoid, got {activation!r}")
        self.activation = activation
        # The tokenizer's model_max_length is a huge sentinel when unset; the position table
        # is the real limit (RoBERTa reserves 2 positions for its padding offset).
        limit = getattr(config, "max_position_embeddings", None)
        if config.model_type in ("roberta", "xlm-roberta", "camembert") and limit:
            limit -= 2
        self.max_length = int(min(max_length, limit or max_length))
        self.model_dir = path
        spec = {"label": self.toxic_label, "act": activation, "max_len": self.max_length}
        if self.satisfied:
            spec["satisfied"] = True
        self.oracle_id = (
            f"hf:{path.resolve().name}@{checkpoint_fingerprint(path)}/"
            f"{json.dumps(spec, sort_keys=True, separators=(',', ':'))}"
        )

    def _score_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        enc = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        enc = {k: v.to(self._device) for k, v in enc.items()}
        with torch.inference_mode():
            logits = self._model(**enc).logits.float()
        if self.activation == "softmax":
            prob = torch.softmax(logits, dim=-1)[:, self.toxic_label]
        else:
            prob = torch.sigmoid(logits[:, self.toxic_label])
        if self.satisfied:  # the score is the probability of *not* having the wanted label
            prob = 1.0 - prob
        return prob.cpu().numpy().astype(np.float32), np.ones(len(texts), bool)

    def score(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Score `texts`, batching similar lengths together to cut padding; original order out."""
        texts = check_texts(texts)
        order = np.argsort([len(t) for t in texts], kind="stable")
        tox_sorted, ok_sorted = super().score([texts[i] for i in order])
        tox = np.empty_like(tox_sorted)
        ok = np.empty_like(ok_sorted)
        tox[order], ok[order] = tox_sorted, ok_sorted
        return tox, ok
