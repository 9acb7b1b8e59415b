"""The trainers of the baselines' LLM updates (docs/baselines.md; their plans and registry
entries: `jaxdetox.methods.baselines`): each `train_*` makes LLM_i from LLM_i−1 on S_i with
`fit`, on the method's budget (the `finetune:` section's optimizer, batch size, epochs and
`max_steps`), and `baseline_finetune` runs one as the iteration's `finetune` stage (the
artefact `lm_params(i)` restores). Rerunning resumes exactly as the method's stages do.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxdetox.data.store_batches import row_batches
from jaxdetox.pipeline import recipe
from jaxdetox.pipeline.experiment import Experiment
from jaxdetox.pipeline.flow import Stage
from jaxdetox.pipeline.record import run_stage
from jaxdetox.pipeline.training import (
    StageResult,
    Streams,
    corpus_stream,
    fit,
    host_batch_size,
    sample_stream,
    stage_steps,
    training_outputs,
)
from jaxdetox.train import flops as flops_lib
from jaxdetox.train.setup import Training, make_training
from jaxdetox.train.steps import lm_step

TrainFn = Callable[[Experiment, int, int], tuple[StageResult, dict[str, Any]]]
"""`(exp, iteration, lm_version) -> (result, extra outputs)`: LLM_lm_version trained on
S_iteration (the iteration's samples)."""


def baseline_finetune(exp: Experiment, stage: Stage, train: TrainFn) -> None:
    """The `finetune` stage of a baseline: LLM_iteration from its `lm` input by `train`."""
    iteration, inputs = stage.iteration, stage.input_versions

    def body() -> dict[str, Any]:
        result, extra = train(exp, iteration, inputs["lm"])
        artifact = exp.artefacts.save("lm", iteration, result.params, inputs)
        exp.artefacts.keep("lm", iteration, result.params)
        kept = {k: v for k, v in result.last_metrics.items() if k.startswith(_REPORTED)}
        return {**training_outputs(result, artifact), **kept, **extra,
                "method": exp.config.method}  # fmt: skip

    run_stage(exp, iteration, "finetune", inputs, body)


_REPORTED = ("lm/reinforce/", "lm/dpo/", "lm/samples/nll", "lm/corpus/nll")


# ----------------------------------------------------------------------------- training


def _lm_training(exp: Experiment, iteration: int, lm_version: int, total: int, *,
                 reference: bool) -> Training:  # fmt: skip
    """LLM_lm_version with the `finetune:` optimizer; the base model as frozen reference
    when `reference` (else none is kept: no step of the method reads it)."""
    cfg = exp.config.finetune
    training = make_training(
        exp.context.lm_module(exp.artefacts.lm_params(lm_version)),
        None,
        exp.context.mesh,
        lm_optimizer=recipe.optimizer_config(cfg.optimizer),
        nado_optimizer=None,
        lm_steps=total,
        reference=exp.artefacts.lm_params(0),
        reference_dtype=cfg.reference_dtype,
        seed=exp.config.seed + iteration,
    )
    if not reference:
        training = dataclasses.replace(
            training,
            state=training.state.replace(ref_params=None),
            shardings=training.shardings.replace(ref_params=None),
        )
    return training


def _samples_steps(exp: Experiment, num_rows: int) -> int:
    cfg = exp.config.finetune
    return stage_steps(num_rows, cfg.batch_size, cfg.epochs, cfg.max_steps)


def _with_corpus(exp: Experiment, iterators: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Add the corpus stream when the config has one; `(iterators, corpus tokens per step)`."""
    c = exp.config.corpus
    if c is None:
        return iterators, 0
    return {**iterators, "corpus": iter(corpus_stream(exp))}, c.batch_size * c.seq_len


def _fit_lm(exp: Experiment, iteration: int, training: Training, step_fn: Any, step_config: Any,
            streams: Streams, total: int, tokens: int, reference_tokens: int) -> StageResult:  # fmt: skip
    """`fit` the LLM; FLOPs = 3·tokens (forward + backward) + reference forwards."""
    seq = exp.prompts.prompt_len + exp.prompts.completion_len
    per_token = flops_lib.body_forward_flops(exp.context.lm_config, seq) + flops_lib.head_flops(
        exp.context.lm_config
    )
    fl = flops_lib.StepFlops(lm=3 * tokens * per_token, reference=reference_tokens * per_token)
    return fit(
        exp, iteration=iteration, stage="finetune", training=training, step_fn=step_fn,
        step_config=step_config, streams=streams, total_steps=total, trained="lm",
        tokens_per_step=tokens, flops_per_step=fl.total,
    )  # fmt: skip


def _sample_tokens(exp: Experiment, rows: int) -> int:
    return rows * (exp.prompts.prompt_len + exp.prompts.completion_len)


def keep_threshold(toxicity: np.ndarray, ok: np.ndarray, quantile: float) -> float:
    """The toxicity at the `quantile` of the scored samples (filter_sft keeps those ≤ it)."""
    scored = toxicity[ok]
    if not len(scored):
        raise ValueError("filter_sft: no sample of this iteration has an oracle score")
    return float(np.quantile(scored, quantile, method="lower"))


def _filter_weights(batch: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    keep = batch["ok_b"] & batch["valid_b"] & (batch["toxicity_b"] <= threshold)
    return {**batch, "weight_b": keep.astype(np.float32)}


def train_filter_sft(
    exp: Experiment, iteration: int, lm_version: int
) -> tuple[StageResult, dict[str, Any]]:
    """SFT of LLM_lm_version on S_iteration's samples at or below the toxicity quantile."""
    table = exp.store.read(iteration, exp.constraints.label_name)
    toxicity = table["toxicity"].to_numpy(zero_copy_only=False)
    ok = table["ok"].to_numpy(zero_copy_only=False)
    threshold = keep_threshold(toxicity, ok, exp.config.baseline.keep_quantile)
    total = _samples_steps(exp, table.num_rows)
    cfg = exp.config.finetune
    batches = sample_stream(exp, iteration, cfg.batch_size, cfg.epochs, exp.config.seed + iteration)
    iterators, corpus_tokens = _with_corpus(exp, {"samples": iter(batches)})
    weigh = functools.partial(_filter_weights, threshold=threshold)
    streams = Streams(iterators, lambda b: {**b, "samples": weigh(b["samples"])})
    step_config = recipe.sft_step_config(cfg, samples=True)
    training = _lm_training(exp, iteration, lm_version, total, reference=False)
    tokens = _sample_tokens(exp, cfg.batch_size) + corpus_tokens
    result = _fit_lm(exp, iteration, training, lm_step, step_config, streams, total, tokens, 0)
    kept = int(np.sum(ok & (toxicity <= threshold)))
    return result, {"keep_threshold": threshold, "kept_samples": kept}


def train_sft_only(
    exp: Experiment, iteration: int, lm_version: int
) -> tuple[StageResult, dict[str, Any]]:
    """LLM_lm_version trained on the corpus NLL alone, for as many steps as the method takes
    on one iteration's samples."""
    cfg, c = exp.config.finetune, exp.config.corpus
    rows = exp.config.prompts.block_size * exp.config.sampling.num_samples
    total = _samples_steps(exp, rows)
    iterators, corpus_tokens = _with_corpus(exp, {})
    step_config = recipe.sft_step_config(cfg, samples=False)
    training = _lm_training(exp, iteration, lm_version, total, reference=False)
    streams = Streams(iterators, lambda b: b)
    result = _fit_lm(exp, iteration, training, lm_step, step_config, streams, total,
                     corpus_tokens, 0)  # fmt: skip
    return result, {"corpus": c.source}


class RewardStream:
    """Sample batches with the REINFORCE inputs: `reward_b` = 1 − toxicity, `label_mask_b`
    (scored rows) and `baseline_b`, the moving average of earlier batches' mean reward (the
    first batch: its own mean). Checkpointable: its state holds the data position and b."""

    def __init__(self, batches: Any, momentum: float) -> None:
        """Wrap a grain iterator of sample batches."""
        self.batches = batches
        self.momentum = momentum
        self.baseline: float | None = None

    def __next__(self) -> dict[str, np.ndarray]:
        from jaxdetox.losses.policy import moving_average

        batch = next(self.batches)
        mask = batch["ok_b"] & batch["valid_b"]
        reward = np.where(mask, 1.0 - batch["toxicity_b"], 0.0).astype(np.float32)
        mean = float(reward[mask].mean()) if mask.any() else None
        current = self.baseline if self.baseline is not None else (mean or 0.0)
        if mean is not None:
            self.baseline = moving_average(self.baseline, mean, self.momentum)
        return {
            **batch,
            "reward_b": reward,
            "label_mask_b": mask.astype(np.float32),
            "baseline_b": np.full(reward.shape, current, np.float32),
        }

    def __iter__(self) -> RewardStream:
        return self

    def get_state(self) -> dict[str, Any]:
        """Data position and baseline (JSON-able)."""
        return {"data": self.batches.get_state(), "baseline": self.baseline}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from `get_state()` output."""
        self.batches.set_state(state["data"])
        self.baseline = state["baseline"]


def train_reinforce(
    exp: Experiment, iteration: int, lm_version: int
) -> tuple[StageResult, dict[str, Any]]:
    """LLM_lm_version updated by REINFORCE on S_iteration (reward 1 − toxicity)."""
    from jaxdetox.train.policy import reinforce_step

    cfg, b = exp.config.finetune, exp.config.baseline
    total = _samples_steps(exp, exp.store.read(iteration, exp.constraints.label_name).num_rows)
    batches = sample_stream(exp, iteration, cfg.batch_size, cfg.epochs, exp.config.seed + iteration)
    rewards = RewardStream(iter(batches), b.baseline_momentum)
    iterators, corpus_tokens = _with_corpus(exp, {"samples": rewards})
    training = _lm_training(exp, iteration, lm_version, total, reference=b.kl_coef > 0)
    tokens = _sample_tokens(exp, cfg.batch_size)
    policy = recipe.policy_config(cfg, b)
    result = _fit_lm(
        exp, iteration, training, reinforce_step, policy, Streams(iterators, lambda x: x),
        total, tokens + corpus_tokens, tokens if b.kl_coef > 0 else 0,
    )  # fmt: skip
    return result, {}


def preference_pairs(
    prompt_ids: np.ndarray, toxicity: np.ndarray, ok: np.ndarray, min_gap: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """`(chosen rows, rejected rows)`: per prompt, its scored samples sorted by toxicity, the
    j-th least toxic paired with the j-th most toxic (j < k/2), kept when the gap is > 0 and
    ≥ `min_gap`. Each sample is in at most one pair."""
    chosen, rejected = [], []
    rows = np.flatnonzero(ok)
    for pid in np.unique(prompt_ids[rows]):
        mine = rows[prompt_ids[rows] == pid]
        mine = mine[np.argsort(toxicity[mine], kind="stable")]
        for j in range(len(mine) // 2):
            win, lose = mine[j], mine[len(mine) - 1 - j]
            gap = toxicity[lose] - toxicity[win]
            if gap > 0 and gap >= min_gap:
                chosen.append(win)
                rejected.append(lose)
    return np.asarray(chosen, np.int64), np.asarray(rejected, np.int64)


def _pair_batch(arrays: Any, chosen: np.ndarray, rejected: np.ndarray, batch_size: int,
                pairs: np.ndarray) -> dict[str, dict[str, np.ndarray]]:  # fmt: skip
    # Module-level (not a lambda) so the pipeline pickles like `host_batches`'.
    pairs = np.asarray(pairs)
    rows_w = np.where(pairs >= 0, chosen[np.maximum(pairs, 0)], -1)
    rows_l = np.where(pairs >= 0, rejected[np.maximum(pairs, 0)], -1)
    good, bad = arrays.batch(rows_w, batch_size), arrays.batch(rows_l, batch_size)
    good["label_mask_b"] = good["valid_b"].astype(np.float32)
    return {"chosen": good, "rejected": bad}


def pair_batches(exp: Experiment, iteration: int, seed: int) -> tuple[Any, int]:
    """`(grain dataset of {"chosen", "rejected"} batches of this host, number of pairs)`."""
    import grain

    cfg = exp.config.finetune
    arrays = exp.store.arrays(
        iteration, oracle=exp.constraints.label_name, prompt_len=exp.prompts.prompt_len,
        completion_len=exp.prompts.completion_len,
    )  # fmt: skip
    chosen, rejected = preference_pairs(
        arrays.prompt_ids, arrays.toxicity, arrays.ok, exp.config.baseline.dpo_min_gap
    )
    if not len(chosen):
        raise ValueError(
            f"dpo, iteration {iteration}: no prompt has two samples with different toxicity "
            "(raise sampling.num_samples or lower baseline.dpo_min_gap)"
        )
    try:
        local = host_batch_size(cfg.batch_size)
    except ValueError as e:
        raise ValueError(f"finetune.{e}") from None
    # The same stream (and so the same planned steps) as the samples': pairs as its rows.
    data = row_batches(len(chosen), local, seed=seed, num_epochs=cfg.epochs)
    data = data.map(functools.partial(_pair_batch, arrays, chosen, rejected, local))
    return data.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)), len(
        chosen
    )


def train_dpo(
    exp: Experiment, iteration: int, lm_version: int
) -> tuple[StageResult, dict[str, Any]]:
    """LLM_lm_version updated by DPO on pairs of S_iteration; reference = the base LLM."""
    from jaxdetox.train.policy import dpo_step

    cfg = exp.config.finetune
    pairs, num_pairs = pair_batches(exp, iteration, exp.config.seed + iteration)
    total = _samples_steps(exp, num_pairs)
    iterators, corpus_tokens = _with_corpus(exp, {"pairs": iter(pairs)})
    streams = Streams(iterators, _flatten_pairs)
    training = _lm_training(exp, iteration, lm_version, total, reference=True)
    tokens = 2 * _sample_tokens(exp, cfg.batch_size)
    policy = recipe.policy_config(cfg, exp.config.baseline)
    result = _fit_lm(exp, iteration, training, dpo_step, policy, streams, total,
                     tokens + corpus_tokens, tokens)  # fmt: skip
    return result, {"pairs": num_pairs}


def _flatten_pairs(batch: dict[str, Any]) -> dict[str, Any]:
    return {**batch["pairs"], **{k: v for k, v in batch.items() if k != "pairs"}}
