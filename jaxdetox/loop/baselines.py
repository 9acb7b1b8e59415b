"""The baselines as loops of the same stages (docs/baselines.md): every method samples with
the run's sampler, labels with its oracle, trains with `fit` and is evaluated by the eval
stage, so a report compares them on the same held-out prompts by construction.

    base            eval of LLM_0 only
    nado_decoding   per iteration: S_i from the frozen base → label → NADO_i (from NADO_i−1);
                    eval = base ⊕ NADO_i guided sampling (the authors' pure_nado.sh)
    filter_sft      per iteration: S_i from LLM_i−1 → label → LLM_i = SFT on the samples
                    whose toxicity ≤ the `baseline.keep_quantile` quantile of S_i (+ corpus NLL)
    reinforce       per iteration: S_i → label → LLM_i by REINFORCE with reward 1 − toxicity,
                    a moving-average baseline, optional sampled KL to the base (+ corpus NLL)
    dpo             per iteration: S_i → label → LLM_i by DPO on pairs of samples of one
                    prompt ranked by the oracle; reference = the base model (+ corpus NLL)
    sft_only        per iteration: LLM_i = LLM_i−1 trained on the corpus NLL alone (λ = 0)
    lambda_sweep    pr_sequential once per λ in `baseline.lambdas`, in RUN/lambda_<λ>/

Every LLM update is a `finetune` stage record (the artefact `lm_params(i)` restores) whose
budget is the method's: the `finetune:` section's optimizer, batch size, epochs and
`max_steps` over S_i. Rerunning resumes exactly as the method's loop does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxdetox.config import RunConfig
from jaxdetox.data.sample_batches import row_batches
from jaxdetox.loop.experiment import Experiment
from jaxdetox.loop.flow import eval_due
from jaxdetox.loop.sequential import (
    _barrier,
    _training_outputs,
    evaluate,
    run_stage,
    sample_and_label,
    train_nado,
)
from jaxdetox.loop.training import (
    StageResult,
    Streams,
    _corpus_batches,
    _sample_batches,
    fit,
    host_batch_size,
    optimizer_config,
    stage_steps,
)
from jaxdetox.train import flops as flops_lib
from jaxdetox.train.setup import Training, make_training
from jaxdetox.train.steps import StepConfig, StreamLoss, lm_step

SWEEP_FILE = "sweep.json"


# ----------------------------------------------------------------------------- stages


def export_models(exp: Experiment, lm_version: int, nado_version: int | None = None) -> None:
    """Write LLM_lm_version as an HF checkpoint in RUN/final/model (+ NADO_nado_version)."""
    from jaxdetox.models import save_nado

    if exp.run.writer:
        exp.language_model(exp.lm_params(lm_version)).save_pretrained(exp.run.final / "model")
        if nado_version is not None:
            save_nado(exp.nado_module(exp.nado_params(nado_version)), exp.run.final / "nado")
    _barrier("export")


def evaluate_guided(exp: Experiment, iteration: int) -> None:
    """The eval stage of base ⊕ NADO_iteration guided decoding (recorded under iteration)."""
    from jaxdetox.loop.evaluation import evaluate_version

    run_stage(
        exp, iteration, "eval", {"lm": 0, "nado": iteration},
        lambda: evaluate_version(exp, iteration, nado=iteration),
    )  # fmt: skip


TrainFn = Callable[[Experiment, int, int], tuple[StageResult, dict[str, Any]]]


def update_lm(exp: Experiment, iteration: int, train: TrainFn, samples: int | None) -> None:
    """The `finetune` stage of a baseline: LLM_iteration from LLM_iteration−1 by `train`."""

    def body() -> dict[str, Any]:
        result, extra = train(exp, iteration, iteration - 1)
        artifact = exp.save_artifact(iteration, "finetune", result.params, inputs)
        exp.keep("lm", iteration, result.params)
        kept = {k: v for k, v in result.last_metrics.items() if k.startswith(_REPORTED)}
        return {**_training_outputs(result, artifact), **kept, **extra,
                "method": exp.config.method}  # fmt: skip

    inputs = {"lm": iteration - 1} | ({} if samples is None else {"samples": samples})
    run_stage(exp, iteration, "finetune", inputs, body)


_REPORTED = ("lm/reinforce/", "lm/dpo/", "lm/samples/nll", "lm/corpus/nll")


# ----------------------------------------------------------------------------- training


def _lm_training(exp: Experiment, iteration: int, lm_version: int, total: int, *,
                 reference: bool) -> Training:  # fmt: skip
    """LLM_lm_version with the `finetune:` optimizer; the base model as frozen reference
    when `reference` (else none is kept: no step of the method reads it)."""
    cfg = exp.config.finetune
    training = make_training(
        exp.lm_module(exp.lm_params(lm_version)),
        None,
        exp.mesh,
        lm_optimizer=optimizer_config(cfg.optimizer),
        nado_optimizer=None,
        lm_steps=total,
        reference=exp.lm_params(0),
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
    return {**iterators, "corpus": iter(_corpus_batches(exp))}, c.batch_size * c.seq_len


def _fit_lm(exp: Experiment, iteration: int, training: Training, step_fn: Any, step_config: Any,
            streams: Streams, total: int, tokens: int, reference_tokens: int) -> StageResult:  # fmt: skip
    """`fit` the LLM; FLOPs = 3·tokens (forward + backward) + reference forwards."""
    seq = exp.prompt_len + exp.completion_len
    per_token = flops_lib.body_forward_flops(exp.lm_config, seq) + flops_lib.head_flops(
        exp.lm_config
    )
    fl = flops_lib.StepFlops(lm=3 * tokens * per_token, reference=reference_tokens * per_token)
    return fit(
        exp, iteration=iteration, stage="finetune", training=training, step_fn=step_fn,
        step_config=step_config, streams=streams, total_steps=total, trained="lm",
        tokens_per_step=tokens, flops_per_step=fl.total,
    )  # fmt: skip


def _sample_tokens(exp: Experiment, rows: int) -> int:
    return rows * (exp.prompt_len + exp.completion_len)


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
    table = exp.store.read(iteration, exp.label_name)
    toxicity = table["toxicity"].to_numpy(zero_copy_only=False)
    ok = table["ok"].to_numpy(zero_copy_only=False)
    threshold = keep_threshold(toxicity, ok, exp.config.baseline.keep_quantile)
    total = _samples_steps(exp, table.num_rows)
    cfg = exp.config.finetune
    batches = _sample_batches(
        exp, iteration, cfg.batch_size, cfg.epochs, exp.config.seed + iteration
    )
    iterators, corpus_tokens = _with_corpus(exp, {"samples": iter(batches)})
    weigh = functools.partial(_filter_weights, threshold=threshold)
    streams = Streams(iterators, lambda b: {**b, "samples": weigh(b["samples"])})
    step_config = StepConfig(
        kl_weight=0.0,
        streams=(
            ("samples", StreamLoss(nll_weight=1.0)),
            ("corpus", StreamLoss(nll_weight=cfg.nll_weight)),
        ),
        micro_batches=cfg.micro_batches,
        chunk_size=cfg.chunk_size,
    )
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
    step_config = StepConfig(
        kl_weight=0.0,
        streams=(("corpus", StreamLoss(nll_weight=cfg.nll_weight)),),
        micro_batches=cfg.micro_batches,
        chunk_size=cfg.chunk_size,
    )
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


def _policy_config(exp: Experiment) -> Any:
    from jaxdetox.train.policy import PolicyConfig

    cfg, b = exp.config.finetune, exp.config.baseline
    return PolicyConfig(
        kl_coef=b.kl_coef, beta=b.dpo_beta, corpus_nll_weight=cfg.nll_weight,
        micro_batches=cfg.micro_batches, chunk_size=cfg.chunk_size,
    )  # fmt: skip


def train_reinforce(
    exp: Experiment, iteration: int, lm_version: int
) -> tuple[StageResult, dict[str, Any]]:
    """LLM_lm_version updated by REINFORCE on S_iteration (reward 1 − toxicity)."""
    from jaxdetox.train.policy import reinforce_step

    cfg, b = exp.config.finetune, exp.config.baseline
    total = _samples_steps(exp, exp.store.read(iteration, exp.label_name).num_rows)
    batches = _sample_batches(
        exp, iteration, cfg.batch_size, cfg.epochs, exp.config.seed + iteration
    )
    rewards = RewardStream(iter(batches), b.baseline_momentum)
    iterators, corpus_tokens = _with_corpus(exp, {"samples": rewards})
    training = _lm_training(exp, iteration, lm_version, total, reference=b.kl_coef > 0)
    tokens = _sample_tokens(exp, cfg.batch_size)
    result = _fit_lm(
        exp, iteration, training, reinforce_step, _policy_config(exp), Streams(iterators, lambda x: x),
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
        iteration, oracle=exp.label_name, prompt_len=exp.prompt_len,
        completion_len=exp.completion_len,
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
    result = _fit_lm(exp, iteration, training, dpo_step, _policy_config(exp), streams, total,
                     tokens + corpus_tokens, tokens)  # fmt: skip
    return result, {"pairs": num_pairs}


def _flatten_pairs(batch: dict[str, Any]) -> dict[str, Any]:
    return {**batch["pairs"], **{k: v for k, v in batch.items() if k != "pairs"}}


# ----------------------------------------------------------------------------- loops


def run_base(exp: Experiment) -> None:
    """`base`: evaluate the model as loaded."""
    evaluate(exp, 0)


def run_nado_decoding(exp: Experiment) -> None:
    """`nado_decoding`: NADO_i on samples of the frozen base; eval base ⊕ NADO_i sampling."""
    n = exp.config.loop.iterations
    if eval_due(exp.config, 0):
        evaluate(exp, 0)
    for i in range(1, n + 1):
        sample_and_label(exp, i, lm_version=0, samples=i, block=i - 1)
        train_nado(exp, i, nado_version=i - 1, samples=i, lm_version=0)
        if eval_due(exp.config, i):
            evaluate_guided(exp, i)
    export_models(exp, 0, n)


def run_lm_baseline(exp: Experiment, train: TrainFn, *, sampled: bool = True) -> None:
    """A fine-tuning baseline: per iteration (sample → label →) update the LLM → eval."""
    n = exp.config.loop.iterations
    if eval_due(exp.config, 0):
        evaluate(exp, 0)
    for i in range(1, n + 1):
        if sampled:
            sample_and_label(exp, i, lm_version=i - 1, samples=i, block=i - 1)
        update_lm(exp, i, train, samples=i if sampled else None)
        if eval_due(exp.config, i):
            evaluate(exp, i)
    export_models(exp, n)


LOOPS: dict[str, Callable[[Experiment], None]] = {
    "base": run_base,
    "nado_decoding": run_nado_decoding,
    "filter_sft": functools.partial(run_lm_baseline, train=train_filter_sft),
    "reinforce": functools.partial(run_lm_baseline, train=train_reinforce),
    "dpo": functools.partial(run_lm_baseline, train=train_dpo),
    "sft_only": functools.partial(run_lm_baseline, train=train_sft_only, sampled=False),
}


# ----------------------------------------------------------------------------- λ sweep


def sweep_configs(config: RunConfig, out: Path) -> list[tuple[RunConfig, Path]]:
    """`lambda_sweep`: one pr_sequential config per λ and its run directory OUT/lambda_<λ>.
    Only the first evaluates the base model (all share it)."""
    runs = []
    for j, lam in enumerate(config.baseline.lambdas):
        sub = config.model_copy(
            update={
                "name": f"{config.name}_lambda{lam:g}",
                "finetune": config.finetune.model_copy(update={"kl_weight": lam}),
                "eval": config.eval.model_copy(update={"base": config.eval.base and j == 0}),
            }
        )
        runs.append((sub, out / f"lambda_{lam:g}"))
    return runs


def write_sweep_index(out: Path, runs: list[tuple[RunConfig, Path]]) -> None:
    """OUT/sweep.json: the sub-run directories (what `report` reads in their place)."""
    out.mkdir(parents=True, exist_ok=True)
    index = {"method": "lambda_sweep", "runs": [p.name for _, p in runs]}
    (out / SWEEP_FILE).write_text(json.dumps(index, indent=2) + "\n")


def is_finished(config: RunConfig, out: Path) -> bool:
    """Whether a run's manifest (each sub-run's, for a sweep) shows its last stage done."""
    if config.method == "lambda_sweep":
        return all(_finished_run(c, p) for c, p in sweep_configs(config, out))
    return _finished_run(config, out)


def _finished_run(config: RunConfig, out: Path) -> bool:
    from jaxdetox.loop.rundir import read_manifest

    if not out.is_dir():
        return False
    done = {(r["iteration"], r["stage"]) for r in read_manifest(out) if r["status"] == "done"}
    if config.method == "base":
        return (0, "eval") in done
    n = config.loop.iterations
    last = "train_nado" if config.method == "nado_decoding" else "finetune"
    exported = any((out / "final" / "model").glob("*.safetensors"))
    return (n, "eval" if config.eval.enabled else last) in done and exported
