"""Tiny models, batches and step runners shared by the training tests."""

from __future__ import annotations

import functools

import jax
import numpy as np

from jaxdetox import sharding
from jaxdetox.data.store_batches import per_prompt_importance_weights
from jaxdetox.models import ModelConfig, NadoConfig, build_model, init_nado
from jaxdetox.train import (
    OptimizerConfig,
    StepConfig,
    StepRunner,
    make_training,
)

CONFIG = ModelConfig(
    family="llama", vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=2,
    head_dim=8, intermediate_size=32, max_position_embeddings=64,
)  # fmt: skip
FULL = StepConfig(consistency="kl", consistency_weight=0.5, importance_weights=True)


def mesh_of(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over the first prod(shape) devices."""
    n = int(np.prod(shape))
    return sharding.make_mesh(shape, jax.devices()[:n])


def training(mesh, *, lm_opt=None, nado_opt=None, variant="separate", lr=1e-2, eps=1e-8):
    """A TrainState with both models trained (Adam, lr) on `mesh`; same values on any mesh.

    Sharding comparisons pass `eps=1e-3`: Adam's g / (|g| + eps) turns a gradient of rounding
    size (1e-12, its sign set by summation order) into a full-size step at eps = 1e-8.
    """
    opt = OptimizerConfig(learning_rate=lr, eps=eps)
    lm = build_model(CONFIG, 0, mesh=mesh)
    nado = init_nado(
        NadoConfig.for_lm(CONFIG, variant, num_layers=1, head_init="normal"), 1, mesh=mesh
    )
    ref = build_model(CONFIG, 7, mesh=mesh)  # a reference different from the student
    return make_training(
        lm, nado, mesh, lm_optimizer=lm_opt or opt, nado_optimizer=nado_opt or opt,
        reference=ref,
    )  # fmt: skip


def stream(rng: np.random.Generator, batch: int = 8, length: int = 10, labels: bool = False):
    """A padded host batch stream: left padding on some rows, loss on the last tokens."""
    tokens = rng.integers(1, CONFIG.vocab_size, (batch, length)).astype(np.int32)
    segments = np.ones((batch, length), np.int32)
    segments[::3, :2] = 0  # left padding on every third row
    positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    mask = np.zeros((batch, length), np.float32)
    mask[:, 4 : length - 1] = 1.0
    out = dict(
        tokens_bt=tokens, segment_ids_bt=segments, positions_bt=positions,
        targets_bt=targets, loss_mask_bt=mask,
    )  # fmt: skip
    if labels:
        label_mask = np.ones(batch, np.float32)
        label_mask[1] = 0.0  # an oracle failure
        out |= dict(
            labels_b=rng.random(batch).astype(np.float32),
            label_mask_b=label_mask,
            model_logprob_b=rng.normal(size=batch).astype(np.float32),
            sampling_logprob_b=rng.normal(size=batch).astype(np.float32),
        )
        out["importance_weight_b"] = per_prompt_importance_weights(  # all rows: one prompt
            np.zeros(batch), out["sampling_logprob_b"], out["model_logprob_b"], label_mask > 0
        )
    return out


def batch(seed: int = 0, batch_size: int = 8):
    """Corpus + samples streams."""
    rng = np.random.default_rng(seed)
    return {
        "corpus": stream(rng, batch_size),
        "samples": stream(rng, batch_size, labels=True),
    }


def runner(step_fn, tr, mesh, config: StepConfig = FULL, donate: bool = False) -> StepRunner:
    """A StepRunner for `step_fn` on this training's models and shardings."""
    fn = functools.partial(step_fn, models=tr.models, config=config)
    return StepRunner(fn, mesh, tr.shardings, donate=donate)


def max_diff(a, b) -> float:
    """Largest absolute difference between two pytrees of arrays."""
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs), default=0.0)
