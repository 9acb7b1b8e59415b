"""The method (posterior-regularised fine-tuning, docs/method.md): its two schemes, its named
variants and the λ sweep. All run the scheme of `loop.scheme` (`flow.plan_stages`)."""

from __future__ import annotations

from pathlib import Path

from jaxdetox.config import RunConfig
from jaxdetox.methods.method import (
    COMMON_STAGES,
    Method,
    corpus_note,
    nado_lines,
    sample_lines,
)
from jaxdetox.pipeline import flow
from jaxdetox.pipeline.finetune import run_finetune
from jaxdetox.pipeline.train_nado import run_train_nado

STAGES = {**COMMON_STAGES, "train_nado": run_train_nado, "finetune": run_finetune}


def describe_iteration(config: RunConfig, kl: str | None = None) -> list[str]:
    """`--dry-run` lines of one iteration (`kl`: how λ is shown; default its value)."""
    f = config.finetune
    kl = f"λ={f.kl_weight}" if kl is None else kl
    return [
        "per iteration i:",
        *sample_lines(config, "LLM_(i-1)"),
        *nado_lines(config),
        f"  finetune   LLM_i from LLM_(i-1): {kl}, α={f.alpha}, KL on {f.kl_on}, {f.epochs} "
        f"epochs, batch {f.batch_size}{corpus_note(config)}",
    ]


def _variant(name: str, summary: str) -> Method:
    return Method(name, summary, flow.plan_stages, STAGES, describe_iteration)


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


def _sweep_rules(config: RunConfig) -> None:
    if config.loop.scheme != "sequential":
        raise ValueError("method 'lambda_sweep' runs the sequential scheme only (loop.scheme)")
    if len(config.baseline.lambdas) < 2:
        raise ValueError("method 'lambda_sweep' needs at least two baseline.lambdas")


def _describe_sweep(config: RunConfig) -> list[str]:
    return [
        f"once per λ in {config.baseline.lambdas} (RUN/lambda_<λ>/):",
        *describe_iteration(config, "λ"),
    ]


METHODS = (
    _variant("pr_sequential", "the method, sequential scheme (docs/method.md)"),
    _variant("pr_parallel", "the method, parallel scheme (paper Fig. 2)"),
    _variant("pr_lora", "the method with LoRA adapters (finetune.lora)"),
    _variant("pr_two_constraints", "the method with further constraints (constraints:)"),
    _variant("pr_paper", "the method with the authors' recipe (linear zero-initialised head)"),
    Method(
        "lambda_sweep",
        "pr_sequential once per λ in baseline.lambdas, in RUN/lambda_<λ>/",
        flow.plan_stages,
        STAGES,
        _describe_sweep,
        check=_sweep_rules,
        sweep=sweep_configs,
    ),
)
"""The method's registry entries (variants name their row; the scheme is `loop.scheme`)."""
