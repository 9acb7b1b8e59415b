"""Stage 4, finetune: LLM_i trained on NLL(corpus) + λ·KL(q ‖ LLM) on S_s, the teacher q the
reference ⊕ every constraint's NADO (docs/method.md). The step loop, its checkpoints and
resume: `pipeline.training.fit`; the baselines' LLM updates: `pipeline.baselines`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxdetox.pipeline import flow, recipe
from jaxdetox.pipeline.experiment import Experiment
from jaxdetox.pipeline.record import run_stage
from jaxdetox.pipeline.training import (
    StageResult,
    Streams,
    corpus_stream,
    fit,
    sample_stream,
    stage_steps,
    training_outputs,
)
from jaxdetox.train import flops as flops_lib
from jaxdetox.train.setup import Training, make_training
from jaxdetox.train.steps import lm_step


def with_all_nados(exp: Experiment, training: Training, nado_version: int) -> Training:
    """`training` whose frozen NADO is every constraint's NADO_{nado_version} (a dict by
    name; the teacher sums their guidance terms), when the run has several constraints."""
    if len(exp.constraints) == 1:
        return training
    names = tuple(c.name for c in exp.constraints)
    params = {
        name: jax.tree.map(jnp.copy, exp.artefacts.nado_params(nado_version, name))
        for name in names
    }
    shard = training.shardings.nado.params
    state = training.state.replace(nado=training.state.nado.replace(params=params))
    shardings = training.shardings.replace(
        nado=training.shardings.nado.replace(params=dict.fromkeys(names, shard))
    )
    models = dataclasses.replace(training.models, nado_names=names)
    return Training(state, models, shardings)


def finetune_stage(
    exp: Experiment, iteration: int, *, lm_version: int, nado_version: int, samples: int
) -> StageResult:
    """LLM_iteration ← LLM_{lm_version} trained on NLL(corpus) + λ·KL(q ‖ LLM) on S_{samples},
    q = reference ⊕ NADO_{nado_version} (reference: the base LLM or LLM_{lm_version})."""
    cfg, conf = exp.config.finetune, exp.config
    num_rows = exp.store.read(samples, exp.constraints.label_name).num_rows
    total = stage_steps(num_rows, cfg.batch_size, cfg.epochs, cfg.max_steps)
    lm_module, reference = student_and_reference(exp, lm_version)
    training = make_training(
        lm_module,
        exp.context.nado_module(exp.artefacts.nado_params(nado_version)),
        exp.context.mesh,
        lm_optimizer=recipe.optimizer_config(cfg.optimizer),
        nado_optimizer=None,
        lm_steps=total,
        reference=reference,
        reference_dtype=cfg.reference_dtype,
        seed=conf.seed + iteration,
    )
    training = with_all_nados(exp, training, nado_version)
    batches = sample_stream(exp, samples, cfg.batch_size, cfg.epochs, conf.seed + iteration)
    iterators = {"samples": iter(batches)}
    seq = exp.prompts.prompt_len + exp.prompts.completion_len
    tokens, kl_tokens = cfg.batch_size * seq, cfg.batch_size * seq
    if conf.corpus is not None:
        iterators["corpus"] = iter(corpus_stream(exp))
        corpus_tokens = conf.corpus.batch_size * conf.corpus.seq_len
        tokens += corpus_tokens
        kl_tokens += corpus_tokens if "corpus" in cfg.kl_on else 0
    step_config = recipe.finetune_step_config(conf)
    streams = Streams(iterators, lambda b: b)
    body = exp.context.nado_config.body if exp.context.nado_config.variant == "separate" else None
    fl = flops_lib.lm_step_flops(
        exp.context.lm_config, body, tokens=tokens, kl_tokens=kl_tokens, seq_len=seq
    )
    return fit(
        exp, iteration=iteration, stage="finetune", training=training, step_fn=lm_step,
        step_config=step_config, streams=streams, total_steps=total, trained="lm",
        tokens_per_step=tokens, flops_per_step=fl.total,
    )  # fmt: skip


def student_and_reference(exp: Experiment, lm_version: int) -> tuple[Any, Any]:
    """The LLM module fine-tuned from LLM_{lm_version} and its teacher's reference
    (`finetune.reference`; LoRA: None, the frozen base is the reference)."""
    if exp.context.lora is not None:  # adapters train; the base is the student's and the reference
        return exp.artefacts.lora_module(lm_version), None
    reference = exp.artefacts.lm_params(
        0 if exp.config.finetune.reference == "base" else lm_version
    )
    return exp.context.lm_module(exp.artefacts.lm_params(lm_version)), reference


def finetune(
    exp: Experiment, iteration: int, lm_version: int, nado_version: int, samples: int
) -> None:
    """Stage 4: LLM_iteration from LLM_{lm_version}, teacher with NADO_{nado_version}."""

    def body() -> dict[str, Any]:
        result = finetune_stage(
            exp, iteration, lm_version=lm_version, nado_version=nado_version, samples=samples
        )
        artifact = exp.artefacts.save("lm", iteration, result.params, inputs)
        exp.artefacts.keep("lm", iteration, result.params)
        return training_outputs(result, artifact)

    inputs = {"lm": lm_version, "nado": nado_version, "samples": samples}
    run_stage(exp, iteration, "finetune", inputs, body)


def run_finetune(exp: Experiment, stage: flow.Stage) -> None:
    """Stage 4 of the method: LLM_iteration by NLL + λ·KL to the guided teacher."""
    v = stage.input_versions
    finetune(exp, stage.iteration, v["lm"], nado_version=v["nado"], samples=v["samples"])
