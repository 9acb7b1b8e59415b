"""The parallel scheme's joint stage (`loop.placement: joint`): NADO_i and LLM_i trained as
one stage on one mesh, one compiled program (`train.steps.joint_step`) per step.

In iteration i ≥ 2 of the parallel scheme both train on S_{i−2}: NADO_i from NADO_{i−1},
decomposing LLM_{i−2} (the LLM that drew S_{i−2}), and LLM_i from LLM_{i−1} with the teacher
reference ⊕ NADO_{i−1}. Nothing in either consumes the other's output, so the executor runs
the plan's `train_nado` and `finetune` of such an iteration as one stage (`fused_units`);
iteration 1 (the warm-up: LLM_1 learns from NADO_1) stays two stages.

How the stage feeds both halves: one stream of S_{i−2}'s rows — every row, `finetune`'s
batch size (which `train_nado.batch_size` must equal, and the micro-batch counts too:
checked at config load), shuffled by the seed both separate stages use — of as many epochs
as the longer schedule. Each step's batch is the same samples for both halves; the NADO
half sees only its training rows (the `train_nado.heldout_fraction` prompts held out get
label mask 0, so they weigh nothing in its loss and denominator; they are still the NADO's
held-out set, evaluated every epoch). Each half keeps its own schedule, counted over the
stream: the LLM `finetune.epochs` passes (capped by `finetune.max_steps`), the NADO
`train_nado.epochs` passes (capped by `train_nado.max_steps`), each with its own learning
rate schedule. The first min(both) steps are joint steps; the longer one then continues
alone on the same stream (`nado_step` or `lm_step`). With equal schedules and no held-out
prompts every batch is the one each separate stage reads, so the joint stage makes the
same NADO_i and LLM_i up to float reordering (tested).

The LLM's teacher NADO stays NADO_{i−1} for the whole stage (a frozen copy beside the NADO
in training, `TrainState.teacher_nado_params`), as in the separate stage; the NADO's
reference is its own when it is another model than the teacher's
(`TrainState.nado_ref_params`: with `finetune.reference: base` only in iteration 2 are both
the base). The reference forward is shared when it is one model.

Resume: the stage checkpoints the LLM and the NADO together (`iter_00i/joint/`), with the
stream's position; the manifest gets the two records the separate stages write (same
inputs and artefacts, outputs marked `joint`), so version checks and later stages are
unchanged. A rerun after the NADO's record was written restores the finished stage from
its last checkpoint (kept until both records are done).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdetox.pipeline import flow, recipe
from jaxdetox.pipeline.experiment import Experiment
from jaxdetox.pipeline.finetune import student_and_reference
from jaxdetox.pipeline.record import run_stage
from jaxdetox.pipeline.train_nado import HeldOut, nado_rows, training_label_mean
from jaxdetox.pipeline.training import (
    Phase,
    StageResult,
    Streams,
    Validation,
    corpus_stream,
    fit,
    sample_stream,
    stage_steps,
    training_outputs,
)
from jaxdetox.train import flops as flops_lib
from jaxdetox.train.setup import Training, make_training
from jaxdetox.train.state import param_shardings, split_params
from jaxdetox.train.steps import joint_step, lm_step, nado_step

STAGE = "joint"  # the stage directory (checkpoints) and metrics name of a joint stage


def joint_pair(nado: flow.Stage, lm: flow.Stage) -> bool:
    """Whether `nado` (a train_nado) and `lm` (a finetune) of one iteration can train as one
    joint stage: the same samples, and the LLM's teacher the NADO the NADO starts from."""
    nv, lv = nado.input_versions, lm.input_versions
    return (
        nado.name == "train_nado"
        and lm.name == "finetune"
        and nado.iteration == lm.iteration
        and nv["samples"] == lv.get("samples")
        and nv["nado"] == lv.get("nado")
    )


def fused_units(stages: list[flow.Stage]) -> list[tuple[flow.Stage, ...]]:
    """The plan as units the executor runs: one stage each, except each joint pair, which
    is one unit where its train_nado was (its finetune's inputs are older: nothing between
    the two makes one)."""
    finetunes = {s.iteration: s for s in stages if s.name == "finetune"}
    paired = {
        s.iteration: (s, finetunes[s.iteration])
        for s in stages
        if s.name == "train_nado" and s.iteration in finetunes
        and joint_pair(s, finetunes[s.iteration])
    }  # fmt: skip
    units: list[tuple[flow.Stage, ...]] = []
    for s in stages:
        if s.name == "train_nado" and s.iteration in paired:
            units.append(paired[s.iteration])
        elif not (s.name == "finetune" and s.iteration in paired):
            units.append((s,))
    return units


def run_joint(exp: Experiment, nado: flow.Stage, lm: flow.Stage) -> None:
    """The joint stage of `nado` and `lm` (a `joint_pair`), recorded as both stages."""
    i, nv, lv = nado.iteration, nado.input_versions, lm.input_versions
    results: dict[str, StageResult] = {}

    def trained() -> dict[str, StageResult]:
        if not results:  # a rerun past the NADO's record: restored from the last checkpoint
            results.update(
                joint_stage(
                    exp,
                    i,
                    lm_version=lv["lm"],
                    nado_version=nv["nado"],
                    nado_lm_version=nv["lm"],
                    samples=nv["samples"],
                )  # fmt: skip
            )
        return results

    def body(kind: str, stage: flow.Stage) -> dict[str, Any]:
        result = trained()[kind]
        artifact = exp.artefacts.save(kind, i, result.params, stage.input_versions)
        exp.artefacts.keep(kind, i, result.params)
        return {**training_outputs(result, artifact), "joint": STAGE}

    run_stage(exp, i, nado.name, nv, lambda: body("nado", nado))
    run_stage(exp, i, lm.name, lv, lambda: body("lm", lm))
    if not exp.config.loop.keep_stage_checkpoints:
        exp.run.drop_stage_checkpoints(i, STAGE)


def with_own_nado_reference(exp: Experiment, training: Training, lm_version: int) -> Training:
    """`training` whose NADO decomposes LLM_{lm_version} (its own reference, placed as the
    separate NADO stage places it)."""
    _, abstract, params = split_params(exp.context.lm_module(exp.artefacts.lm_params(lm_version)))
    shardings = param_shardings(abstract, exp.context.mesh)
    params = jax.tree.map(jnp.copy, params)  # the state is donated: never alias the artefact
    return dataclasses.replace(
        training,
        state=training.state.replace(nado_ref_params=params),
        shardings=training.shardings.replace(nado_ref_params=shardings),
    )


def joint_stage(
    exp: Experiment,
    iteration: int,
    *,
    lm_version: int,
    nado_version: int,
    nado_lm_version: int,
    samples: int,
) -> dict[str, StageResult]:
    """NADO_iteration (from NADO_{nado_version}, decomposing LLM_{nado_lm_version}) and
    LLM_iteration (from LLM_{lm_version}, teacher NADO_{nado_version}) trained together on
    S_{samples}: `{"nado": result, "lm": result}` (see the module docstring)."""
    conf, f, n = exp.config, exp.config.finetune, exp.config.train_nado
    constraint = exp.constraints[0]
    arrays, train_rows, heldout_rows = nado_rows(exp, iteration, samples, constraint)
    rows, batch_size = arrays.num_rows, f.batch_size
    lm_steps = stage_steps(rows, batch_size, f.epochs, f.max_steps)
    nado_steps = stage_steps(rows, batch_size, n.epochs, n.max_steps)
    lm_module, reference = student_and_reference(exp, lm_version)
    start_nado = exp.artefacts.nado_params(nado_version)
    training = make_training(
        lm_module,
        exp.context.nado_module(start_nado),
        exp.context.mesh,
        lm_optimizer=recipe.optimizer_config(f.optimizer),
        nado_optimizer=recipe.nado_optimizer_config(n),
        lm_steps=lm_steps,
        nado_steps=nado_steps,
        reference=reference,
        reference_dtype=f.reference_dtype,
        seed=conf.seed + iteration,
    )
    teacher = jax.tree.map(jnp.copy, start_nado)  # NADO_{nado_version}, frozen
    training = dataclasses.replace(
        training,
        state=training.state.replace(teacher_nado_params=teacher),
        shardings=training.shardings.replace(teacher_nado_params=training.shardings.nado.params),
    )
    teacher_ref = 0 if exp.context.lora is not None or f.reference == "base" else lm_version
    if nado_lm_version != teacher_ref or f.reference_dtype is not None:
        training = with_own_nado_reference(exp, training, nado_lm_version)

    held_prompts = np.unique(arrays.prompt_ids[heldout_rows])

    def labelled(batch: dict[str, Any]) -> dict[str, Any]:
        samples_b = exp.constraints.labels(batch["samples"], constraint)
        mask = samples_b["label_mask_b"] * ~np.isin(samples_b["prompt_ids_b"], held_prompts)
        return {**batch, "samples": {**samples_b, "label_mask_b": mask.astype(np.float32)}}

    epochs = max(f.epochs, n.epochs)
    iterators = {
        "samples": iter(sample_stream(exp, samples, batch_size, epochs, conf.seed + iteration))
    }
    if conf.corpus is not None:
        iterators["corpus"] = iter(corpus_stream(exp))
    phases = _phases(exp, lm_steps, nado_steps)
    validation, heldout, initial_probe = None, None, None
    if len(heldout_rows):
        heldout = HeldOut(exp, training, arrays, heldout_rows, batch_size, constraint)
        epoch_steps = stage_steps(rows, batch_size, 1, None)
        validation = Validation(every=epoch_steps, evaluate=heldout.bce, metric="nado/heldout_bce")
        initial_probe = heldout.probe_logits(training.state)
    result = fit(
        exp, iteration=iteration, stage=STAGE, training=training, step_fn=joint_step,
        step_config=phases[0].step_config, streams=Streams(iterators, labelled),
        total_steps=phases[-1].until, trained=("lm", "nado"),
        tokens_per_step=phases[0].tokens_per_step, flops_per_step=phases[0].flops_per_step,
        validation=validation, phases=phases,
    )  # fmt: skip
    quality = None
    if heldout is not None:
        label_mean = training_label_mean(exp, arrays, constraint, train_rows)
        quality = heldout.checked_quality(
            result.state, initial_probe, label_mean, f"iteration {iteration}: NADO (joint stage)"
        )

    def part(kind: str, steps: int, **extra: Any) -> StageResult:
        keys = [k for k in result.last_metrics if not k.startswith(("lm/", "nado/"))]
        own = [k for k in result.last_metrics if k.startswith(f"{kind}/")]
        return StageResult(
            result.params[kind], steps, {k: result.last_metrics[k] for k in keys + own},
            min(result.resumed_from, steps), result.compile_count, **extra,
        )  # fmt: skip

    return {
        "nado": part("nado", nado_steps, validation=result.validation, quality=quality),
        "lm": part("lm", lm_steps),
    }


def _phases(exp: Experiment, lm_steps: int, nado_steps: int) -> tuple[Phase, ...]:
    """The joint steps, then the longer schedule's own steps alone."""
    conf, f = exp.config, exp.config.finetune
    seq = exp.prompts.prompt_len + exp.prompts.completion_len
    tokens = kl_tokens = f.batch_size * seq
    if conf.corpus is not None:
        corpus_tokens = conf.corpus.batch_size * conf.corpus.seq_len
        tokens += corpus_tokens
        kl_tokens += corpus_tokens if "corpus" in f.kl_on else 0
    body = exp.context.nado_config.body if exp.context.nado_config.variant == "separate" else None
    consistency = conf.train_nado.consistency is not None
    lm_fl = flops_lib.lm_step_flops(
        exp.context.lm_config, body, tokens=tokens, kl_tokens=kl_tokens, seq_len=seq
    ).total
    nado_fl = flops_lib.nado_step_flops(
        exp.context.lm_config, body, tokens=f.batch_size * seq, seq_len=seq, consistency=consistency
    ).total
    shared = min(lm_steps, nado_steps)
    phases = [Phase(shared, joint_step, recipe.joint_step_config(conf), tokens, lm_fl + nado_fl)]
    if lm_steps > shared:
        phases.append(Phase(lm_steps, lm_step, recipe.finetune_step_config(conf), tokens, lm_fl))
    elif nado_steps > shared:
        nado_config = recipe.nado_step_config(conf.train_nado)
        phases.append(Phase(nado_steps, nado_step, nado_config, f.batch_size * seq, nado_fl))
    return tuple(phases)
