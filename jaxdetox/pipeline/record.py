"""The stages of an iteration, shared by both schemes (their data flow: `flow.plan_stages`;
who runs them where: `placement.py`): sample S_s from some LLM_j → label S_s → train NADO_i
(from NADO_k) on S_s → fine-tune LLM_i (from LLM_{i−1}) with the teacher reference ⊕ NADO;
evaluate; export the last LLM and NADO.

Rerunning the same command resumes: a stage whose manifest record is `done` is skipped (its
artefact is restored when a later stage needs it), an unfinished sampling / labelling stage
continues from its committed chunks, and an unfinished training stage from its last
checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import multihost_utils

from jaxdetox import fileio
from jaxdetox.pipeline.experiment import Experiment
from jaxdetox.pipeline.training import finetune_stage, train_nado_stage

logger = logging.getLogger(__name__)


def barrier(name: str) -> None:
    """Wait for every process (multi-host runs; a no-op on one host)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def run_stage(
    exp: Experiment,
    iteration: int,
    stage: str,
    inputs: dict[str, int | None],
    body: Callable[[], dict[str, Any]],
    versions: dict[str, int] | None = None,
) -> bool:
    """Run one stage unless the manifest has it done; record it. Returns True if it ran.

    `versions`: artefact versions the stage produces, recorded in its outputs. A stage that
    raises is recorded `failed` (with the error), so roles waiting for it stop too.
    """
    from jaxdetox.pipeline.flow import ROLE_OF

    run = exp.run
    if run.is_done(iteration, stage):
        logger.info("iteration %d %s: done earlier, skipped", iteration, stage)
        return False
    previous = run.record(iteration, stage)
    if previous is not None and previous["inputs"] != inputs:
        raise RuntimeError(
            f"iteration {iteration} {stage}: a started record consumed {previous['inputs']}, "
            f"this run would consume {inputs}; refusing to mix versions"
        )
    where = {
        "role": ROLE_OF[stage],
        "devices": int(exp.context.mesh.devices.size),
        "started": time.time(),
    }
    run.update_record(iteration, stage, status="running", inputs=inputs, **where)
    start, fetched = time.perf_counter(), exp.artefacts.handover_seconds
    try:
        outputs = {**(versions or {}), **body()}
        # time spent resharding / restoring other stages' models (the schedule's hand-over)
        outputs["handover_seconds"] = round(exp.artefacts.handover_seconds - fetched, 3)
    except Exception as e:
        run.update_record(
            iteration, stage, status="failed", inputs=inputs,
            outputs={"error": f"{type(e).__name__}: {e}"}, **where,
        )  # fmt: skip
        raise
    barrier(f"{stage}-{iteration}")
    run.update_record(
        iteration, stage, status="done", inputs=inputs, outputs=outputs,
        seconds=time.perf_counter() - start, **where,
    )  # fmt: skip
    if not exp.config.loop.keep_stage_checkpoints:
        run.drop_stage_checkpoints(iteration, stage)
    return True


def sample(exp: Experiment, iteration: int, lm_version: int, samples: int, block: int) -> None:
    """Stage 1 run in `iteration`: S_{samples} from LLM_{lm_version} on prompt block `block`
    (0-based; every sample version has its own block). The store records LLM_{lm_version}."""
    from jaxdetox.pipeline.sample import sample_stage

    def body() -> dict[str, Any]:
        report = sample_stage(
            exp.samplers.plain,
            exp.samplers.lm_state(lm_version),
            exp.prompts.train_prompts(block),
            exp.store,
            samples,
            exp.prompts.sampling_config(samples),
            tokenizer=exp.context.tokenizer,
            batch_size=exp.config.sampling.batch_size,
            progress=exp.progress,
            versions={"lm": lm_version},
        )
        return {"prompts": report.processed + report.skipped, **report.extra}

    run_stage(exp, iteration, "sample", {"lm": lm_version}, body, {"samples": samples})


def label(exp: Experiment, iteration: int, samples: int) -> None:
    """Stage 2 run in `iteration`: every constraint's oracle labels S_{samples}."""
    from jaxdetox.pipeline.sample import label_stage

    def body() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, c in enumerate(exp.constraints):
            report = label_stage(
                exp.store, samples, exp.constraints.oracle(c), c.label_name,
                batch_size=c.oracle.batch_size, progress=exp.progress,
            )  # fmt: skip
            if i == 0:
                out |= {"scored": report.processed, **report.extra}
            else:
                out[f"scored_{c.name}"] = report.processed
        return out

    run_stage(exp, iteration, "label", {"samples": samples}, body)


def training_outputs(result: Any, artifact: str) -> dict[str, Any]:
    """The manifest outputs of a training stage: steps, resume point, artefact, last metrics."""
    keep = ("nado/bce", "nado/consistency", "lm/samples/kl", "lm/corpus/nll", "mfu")
    return {
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "compiles": result.compile_count,
        "artifact": artifact,
        **{k: result.last_metrics[k] for k in keep if k in result.last_metrics},
        **({"validation": result.validation} if result.validation is not None else {}),
        **({"nado_quality": result.quality} if result.quality is not None else {}),
    }


def sampled_by(exp: Experiment, samples: int) -> int | None:
    """The LLM version the sample store records as having drawn S_{samples} (None: none)."""
    info = exp.store.done_info(samples, "sampled") or {}
    return info.get("versions", {}).get("lm")


def train_nado(
    exp: Experiment,
    iteration: int,
    nado_version: int,
    samples: int,
    lm_version: int | None = None,
) -> None:
    """Stage 3: NADO_iteration from NADO_{nado_version} on S_{samples}, decomposing
    LLM_{lm_version}: the LLM that drew S_{samples} (None: the one the store records)."""
    if lm_version is None:
        lm_version = sampled_by(exp, samples)
        if lm_version is None:
            raise ValueError(
                f"train_nado of iteration {iteration}: the sample store {exp.store.root} does "
                f"not record which LLM drew S_{samples} (its sampled.done.json has no "
                "versions.lm); the NADO must decompose that LLM"
            )
    kw = {"nado_version": nado_version, "samples": samples, "lm_version": lm_version}

    def body() -> dict[str, Any]:
        result = train_nado_stage(exp, iteration, **kw)
        artifact = exp.artefacts.save("nado", iteration, result.params, inputs)
        exp.artefacts.keep("nado", iteration, result.params)
        outputs = training_outputs(result, artifact)
        for c in exp.constraints[1:]:  # one NADO per further constraint, on its own labels
            result = train_nado_stage(exp, iteration, **kw, constraint=c)
            exp.artefacts.save("nado", iteration, result.params, inputs, constraint=c.name)
            exp.artefacts.keep("nado", iteration, result.params, constraint=c.name)
            outputs[f"nado/bce/{c.name}"] = result.last_metrics.get("nado/bce")
            if result.quality is not None:
                outputs[f"nado_quality_{c.name}"] = result.quality
        return outputs

    inputs = {"lm": lm_version, "nado": nado_version, "samples": samples}
    run_stage(exp, iteration, "train_nado", inputs, body)


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


def export_final(exp: Experiment, lm_version: int, nado_version: int | None = None) -> None:
    """Write LLM_lm_version as an HF checkpoint (+ tokenizer; LoRA: + its adapters) and, with
    `nado_version`, NADO_nado_version of every constraint into the run's `final/` (staged
    locally, then uploaded when the run directory is on gs://)."""
    from jaxdetox.models import save_nado

    lm_params = exp.artefacts.lm_params(lm_version)
    nado_params = None if nado_version is None else exp.artefacts.nado_params(nado_version)
    if exp.run.writer:  # safetensors write local files: staged, then uploaded if gs://...
        with fileio.local_dir(exp.run.final / "model") as model_dir:
            exp.context.language_model(lm_params).save_pretrained(model_dir)
        if exp.context.lora is not None and lm_version > 0:  # the adapters, with their base model
            from jaxdetox.models.lora import save_adapters

            with fileio.local_dir(exp.run.final / "adapters") as adapter_dir:
                base = exp.config.model.path
                save_adapters(
                    adapter_dir, exp.artefacts.adapters(lm_version), exp.context.lora.config, base
                )
        if nado_version is not None:
            with fileio.local_dir(exp.run.final / "nado") as nado_dir:
                save_nado(exp.context.nado_module(nado_params), nado_dir)
            for c in exp.constraints[1:]:
                params = exp.artefacts.nado_params(nado_version, c.name)
                with fileio.local_dir(exp.run.final / f"nado_{c.name}") as nado_dir:
                    save_nado(exp.context.nado_module(params), nado_dir)
    barrier("export")


def evaluate(exp: Experiment, version: int, nado: int | None = None) -> None:
    """The eval stage of LLM_version (recorded under iteration = version; 0 = base), or with
    `nado` of base ⊕ NADO_nado guided decoding (recorded under iteration = version)."""
    from jaxdetox.pipeline.evaluation import evaluate_version

    inputs = {"lm": version} if nado is None else {"lm": 0, "nado": nado}
    run_stage(exp, version, "eval", inputs, lambda: evaluate_version(exp, version, nado=nado))
