"""Config sections → the settings the steps, the optimizer, the corpus reader and the sampler
take: the one translation, shared by the training stages (`pipeline.train_nado`,
`pipeline.finetune`, `pipeline.baselines`) and the memory planner (`planning.memory`), so a
planned step is the step that runs.

The config keys are the users' contract; where the internal name differs, it differs here
only:

    config key                              internal setting
    finetune.kl_weight                      StepConfig.kl_weight (λ)
    finetune.alpha, constraints[].alpha     StepConfig.alpha / alphas (guidance strength α)
    finetune.nll_weight                     the corpus stream's StreamLoss.nll_weight;
                                            PolicyConfig.corpus_nll_weight
    baseline.dpo_beta                       PolicyConfig.beta
    baseline.kl_coef                        PolicyConfig.kl_coef
    corpus.batch_size                       CorpusConfig.global_batch_size
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxdetox.config import (
    BaselineSection,
    CorpusSection,
    FinetuneSection,
    OptimizerSection,
    RunConfig,
    SamplingSection,
    TrainNadoSection,
)
from jaxdetox.train.optimizer import OptimizerConfig
from jaxdetox.train.steps import StepConfig, StreamLoss


def optimizer_config(section: OptimizerSection) -> OptimizerConfig:
    """`OptimizerConfig` from a config's optimizer section."""
    data = section.model_dump()
    data["trainable"] = tuple(data["trainable"])
    return OptimizerConfig(**data)


def nado_optimizer_config(section: TrainNadoSection) -> OptimizerConfig:
    """The NADO's optimizer: `train_nado.optimizer`, the head in its own parameter group when
    `head_learning_rate` / `head_weight_decay` are set, the NADO's constants frozen."""
    from jaxdetox.models.nado import FROZEN_PARAMS

    config = dataclasses.replace(optimizer_config(section.optimizer), frozen=FROZEN_PARAMS)
    if section.head_learning_rate is None and section.head_weight_decay is None:
        return config
    lr = config.learning_rate if section.head_learning_rate is None else section.head_learning_rate
    wd = config.weight_decay if section.head_weight_decay is None else section.head_weight_decay
    return dataclasses.replace(config, groups=((r"^head\.", lr, wd),))


def nado_step_config(section: TrainNadoSection) -> StepConfig:
    """The `StepConfig` of a NADO training stage from the config's `train_nado` section."""
    return StepConfig(
        consistency=section.consistency,
        consistency_weight=section.consistency_weight,
        consistency_reverse=section.consistency_reverse,
        importance_weights=section.importance_weights,
        micro_batches=section.micro_batches,
    )


def guidance_alphas(config: RunConfig) -> tuple[float, ...] | None:
    """α of each constraint's NADO in the teacher (the oracle's: `finetune.alpha`), when the
    run has further constraints; None with one NADO (`StepConfig.alpha` then)."""
    if not config.constraints:
        return None
    return (config.finetune.alpha, *(c.alpha for c in config.constraints))


def finetune_step_config(config: RunConfig) -> StepConfig:
    """The method's LLM step: NLL(corpus) + λ·KL(q ‖ p_θ) on the prefixes of `kl_on`."""
    f = config.finetune
    streams = (("samples", StreamLoss(nll_weight=0.0, kl="samples" in f.kl_on)),)
    if config.corpus is not None:
        streams += (("corpus", StreamLoss(nll_weight=f.nll_weight, kl="corpus" in f.kl_on)),)
    return StepConfig(
        kl_weight=f.kl_weight,
        alpha=f.alpha,
        alphas=guidance_alphas(config),
        streams=streams,
        micro_batches=f.micro_batches,
        chunk_size=f.chunk_size,
    )


def joint_step_config(config: RunConfig) -> StepConfig:
    """The parallel scheme's joint step (`loop.placement: joint`): the LLM step of
    `finetune_step_config` with the NADO loss of `nado_step_config` (their micro-batch
    counts agree, checked at config load; the chunk size is `finetune.chunk_size`)."""
    nado = nado_step_config(config.train_nado)
    return dataclasses.replace(
        finetune_step_config(config),
        consistency=nado.consistency,
        consistency_weight=nado.consistency_weight,
        consistency_reverse=nado.consistency_reverse,
        importance_weights=nado.importance_weights,
    )


def sft_step_config(section: FinetuneSection, *, samples: bool) -> StepConfig:
    """An SFT step without teacher: NLL of the (weighted) samples when `samples` (filter_sft),
    plus the corpus NLL (sft_only: that alone)."""
    corpus = (("corpus", StreamLoss(nll_weight=section.nll_weight)),)
    sampled = (("samples", StreamLoss(nll_weight=1.0)),) if samples else ()
    return StepConfig(
        kl_weight=0.0,
        streams=sampled + corpus,
        micro_batches=section.micro_batches,
        chunk_size=section.chunk_size,
    )


def policy_config(finetune: FinetuneSection, baseline: BaselineSection) -> Any:
    """The `PolicyConfig` of the REINFORCE and DPO steps."""
    from jaxdetox.train.policy import PolicyConfig

    return PolicyConfig(
        kl_coef=baseline.kl_coef,
        beta=baseline.dpo_beta,
        corpus_nll_weight=finetune.nll_weight,
        micro_batches=finetune.micro_batches,
        chunk_size=finetune.chunk_size,
    )


def corpus_config(section: CorpusSection, source: str) -> Any:
    """The `CorpusConfig` of the `corpus:` section, read from `source` (`builtin` resolved
    to its file by the caller), endless."""
    from jaxdetox.data.corpora import CorpusConfig

    return CorpusConfig(
        source=source, split=section.split, data_dir=section.data_dir,
        text_field=section.text_field, prompt_field=section.prompt_field,
        seq_len=section.seq_len, global_batch_size=section.batch_size, seed=section.seed,
        num_epochs=None,
    )  # fmt: skip


def sampling_config(
    section: SamplingSection, *, eos_token_ids: tuple[int, ...], pad_token_id: int, samples: int
) -> Any:
    """The `SamplingConfig` of sample version `samples` (its own seed)."""
    from jaxdetox.sampling import SamplingConfig

    return SamplingConfig(
        max_new_tokens=section.max_new_tokens,
        temperature=section.temperature,
        top_k=section.top_k,
        top_p=section.top_p,
        num_samples=section.num_samples,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        seed=section.seed + 1000 * samples,
    )
