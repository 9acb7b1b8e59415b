"""What a method is: its stage plan in the vocabulary of `pipeline.flow`, what runs each of its
stages, its rules over the config, and the lines that describe it (`--dry-run`, report).

Every method runs through the one executor (`pipeline.placement.run_stages`): it walks
`plan(config)`, waits for each stage's inputs, checks their versions and calls
`stages[stage.name]` (the stage functions live in the stage modules of `pipeline/`). So the
placements (`colocated`, `split`, `jobs`), resume, version checks and the export (staged
locally, uploaded to gs://) are the same for the method and every baseline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jaxdetox.config import RunConfig
from jaxdetox.pipeline import flow
from jaxdetox.pipeline.evaluation import run_eval
from jaxdetox.pipeline.experiment import Experiment
from jaxdetox.pipeline.export import run_export
from jaxdetox.pipeline.label import run_label
from jaxdetox.pipeline.sample import run_sample

StageFn = Callable[[Experiment, flow.Stage], None]
"""Runs one stage of a plan (recording it in the manifest; a done one is skipped)."""


def _no_rules(config: RunConfig) -> None:
    """A method without rules of its own."""


def finetune_kl_weight(config: dict[str, Any]) -> float | None:
    """The λ of a saved config (`finetune.kl_weight`; None when not saved)."""
    return config.get("finetune", {}).get("kl_weight")


@dataclasses.dataclass(frozen=True)
class Method:
    """One `method:` of a run config."""

    name: str
    summary: str  # one line: what the method is (its row in a report)
    plan: Callable[[RunConfig], list[flow.Stage]]  # every stage, in the colocated order
    stages: Mapping[str, StageFn]  # what runs each stage name of the plan (trainers included)
    describe: Callable[[RunConfig], list[str]]  # what an iteration does (`--dry-run`)
    check: Callable[[RunConfig], None] = _no_rules  # rules over sections (raise ValueError)
    samples: bool = True  # draws training samples from the prompt blocks
    # The λ (finetune.kl_weight) its report row shows, from the run's saved config dict.
    row_kl_weight: Callable[[dict[str, Any]], float | None] = finetune_kl_weight
    # A method that runs as several runs (`lambda_sweep`): their configs and directories.
    sweep: Callable[[RunConfig, Path], list[tuple[RunConfig, Path]]] | None = None

    def run(self, exp: Experiment, stage: flow.Stage) -> None:
        """Run one stage of this method's plan."""
        fn = self.stages.get(stage.name)
        if fn is None:
            raise ValueError(f"method {self.name!r} has no stage {stage.name!r}")
        fn(exp, stage)


# ----------------------------------------------------------------------------- stages


COMMON_STAGES: dict[str, StageFn] = {
    "sample": run_sample,
    "label": run_label,
    "eval": run_eval,
    "export": run_export,
}
"""The stages every method runs the same way."""


# ----------------------------------------------------------------------------- describe


def sample_lines(config: RunConfig, source: str) -> list[str]:
    """`--dry-run` lines of the sample and label stages (`source`: the LLM sampled)."""
    return [
        f"  sample     S_i: {config.prompts.block_size} prompts x {config.sampling.num_samples} "
        f"samples x {config.sampling.max_new_tokens} tokens from {source}",
        f"  label      S_i with oracle {config.oracle.name!r}",
    ]


def nado_lines(config: RunConfig) -> list[str]:
    """`--dry-run` line of the train_nado stage."""
    cfg = config.train_nado
    return [f"  train_nado NADO_i from NADO_(i-1): {cfg.epochs} epochs, batch {cfg.batch_size}"]


def budget(config: RunConfig) -> str:
    """The fine-tuning budget every LLM update shares (`finetune:`)."""
    f = config.finetune
    return f"{f.epochs} epochs, batch {f.batch_size}, max_steps {f.max_steps}"


def corpus_note(config: RunConfig) -> str:
    """`, + corpus NLL` when a corpus term rides along."""
    return ", + corpus NLL" if config.corpus else ""
