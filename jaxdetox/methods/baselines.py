"""The baselines (docs/baselines.md) as plans of the method's stages: every one samples with
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

Every LLM update is a `finetune` stage (its trainer: `pipeline.baselines.train_*`) whose budget
is the method's: the `finetune:` section's optimizer, batch size, epochs and `max_steps`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from jaxdetox.config import RunConfig
from jaxdetox.methods.method import (
    COMMON_STAGES,
    Method,
    StageFn,
    budget,
    corpus_note,
    nado_lines,
    sample_lines,
)
from jaxdetox.pipeline import baselines as trainers
from jaxdetox.pipeline import flow
from jaxdetox.pipeline.train_nado import run_train_nado


def _sequential_only(name: str, config: RunConfig) -> None:
    if config.loop.scheme != "sequential":
        raise ValueError(f"method {name!r} runs the sequential scheme only (loop.scheme)")


def _evaluated(config: RunConfig, version: int, **guided: int) -> list[flow.Stage]:
    """The eval stage of `version` when it is due."""
    return [flow.eval_stage(version, **guided)] if flow.eval_due(config, version) else []


# ----------------------------------------------------------------------------- base


def plan_base(config: RunConfig) -> list[flow.Stage]:
    """`base`: the eval of the model as loaded."""
    return [flow.eval_stage(0)]


def _base_rules(config: RunConfig) -> None:
    _sequential_only("base", config)
    if not (config.eval.enabled and config.eval.base):
        raise ValueError("method 'base' only evaluates: eval.enabled and eval.base must be on")


# ----------------------------------------------------------------------------- nado_decoding


def plan_nado_decoding(config: RunConfig) -> list[flow.Stage]:
    """`nado_decoding`: per iteration S_i from the frozen base → label → NADO_i; the eval
    of base ⊕ NADO_i guided sampling; export LLM_0 and NADO_n."""
    n = config.loop.iterations
    stages = _evaluated(config, 0)
    for i in range(1, n + 1):
        stages += flow.sample_stages(i, lm=0, samples=i, block=i - 1)
        stages.append(flow.nado_stage(i, lm=0, nado=i - 1, samples=i))
        stages += _evaluated(config, i, lm=0, nado=i)
    return [*stages, flow.export_stage(n, lm=0, nado=n)]


def _describe_nado_decoding(config: RunConfig) -> list[str]:
    guided = f"  eval       base ⊕ NADO_i guided sampling, α={config.baseline.alpha}"
    return ["per iteration i:", *sample_lines(config, "LLM_0 (frozen base)"),
            *nado_lines(config), guided]  # fmt: skip


# ----------------------------------------------------------------------------- LLM updates


def plan_lm_updates(config: RunConfig, *, sampled: bool = True) -> list[flow.Stage]:
    """A fine-tuning baseline: per iteration (S_i from LLM_i−1 → label →) LLM_i → eval;
    export LLM_n."""
    n = config.loop.iterations
    stages = _evaluated(config, 0)
    for i in range(1, n + 1):
        if sampled:
            stages += flow.sample_stages(i, lm=i - 1, samples=i, block=i - 1)
        stages.append(flow.lm_stage(i, lm=i - 1, samples=i if sampled else None))
        stages += _evaluated(config, i)
    return [*stages, flow.export_stage(n, lm=n)]


def _lm_baseline(
    name: str,
    summary: str,
    train: trainers.TrainFn,
    line: Callable[[RunConfig], str],
    *,
    sampled: bool = True,
    rules: Callable[[RunConfig], None] | None = None,
    row_kl: float | None = None,
) -> Method:
    """The registry entry of a baseline that updates the LLM with `train` each iteration."""

    def describe(config: RunConfig) -> list[str]:
        sample = sample_lines(config, "LLM_(i-1)") if sampled else []
        return ["per iteration i:", *sample, f"  finetune   {line(config)}"]

    def check(config: RunConfig) -> None:
        _sequential_only(name, config)
        if rules is not None:
            rules(config)

    finetune: StageFn = functools.partial(trainers.baseline_finetune, train=train)
    return Method(
        name, summary, functools.partial(plan_lm_updates, sampled=sampled),
        {**COMMON_STAGES, "finetune": finetune}, describe, check=check, samples=sampled,
        row_kl_weight=lambda saved: row_kl,
    )  # fmt: skip


def _sft_only_rules(config: RunConfig) -> None:
    if config.corpus is None:
        raise ValueError("method 'sft_only' trains on the corpus NLL alone: set `corpus:`")


def _dpo_rules(config: RunConfig) -> None:
    if config.sampling.num_samples < 2:
        raise ValueError("method 'dpo' pairs samples of one prompt: sampling.num_samples >= 2")


METHODS = (
    Method(
        "base", "the model as loaded, evaluated", plan_base, COMMON_STAGES,
        lambda config: ["evaluation only: the base model on the held-out prompts"],
        check=_base_rules, samples=False, row_kl_weight=lambda saved: None,
    ),
    Method(
        "nado_decoding", "base ⊕ NADO guided decoding (the authors' pure_nado.sh)",
        plan_nado_decoding, {**COMMON_STAGES, "train_nado": run_train_nado},
        _describe_nado_decoding, check=functools.partial(_sequential_only, "nado_decoding"),
        row_kl_weight=lambda saved: None,
    ),
    _lm_baseline(
        "filter_sft", "SFT on the samples at or below a toxicity quantile",
        trainers.train_filter_sft,
        lambda c: f"NLL on S_i with toxicity <= its {c.baseline.keep_quantile} quantile: "
        f"{budget(c)}{corpus_note(c)}",
    ),
    _lm_baseline(
        "reinforce", "REINFORCE with reward 1 − toxicity", trainers.train_reinforce,
        lambda c: f"REINFORCE, r = 1 - toxicity, moving-average baseline "
        f"(m={c.baseline.baseline_momentum}), KL coef {c.baseline.kl_coef}: "
        f"{budget(c)}{corpus_note(c)}",
    ),
    _lm_baseline(
        "dpo", "DPO on oracle-ranked pairs of samples", trainers.train_dpo,
        lambda c: f"DPO on pairs of S_i (β={c.baseline.dpo_beta}, reference = base): "
        f"{budget(c)}{corpus_note(c)}",
        rules=_dpo_rules,
    ),
    _lm_baseline(
        "sft_only", "the corpus NLL alone (λ = 0)", trainers.train_sft_only,
        lambda c: f"corpus NLL alone (λ = 0): {budget(c)}", sampled=False, rules=_sft_only_rules,
        row_kl=0.0,
    ),
)  # fmt: skip
"""The baselines' registry entries."""
