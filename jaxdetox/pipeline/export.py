"""The export: the run's last LLM (HF checkpoint + tokenizer; with LoRA its adapters too) and
NADO of every constraint into `final/`, staged locally and uploaded when the run directory is
on gs://."""

from __future__ import annotations

from jaxdetox import fileio
from jaxdetox.pipeline import flow
from jaxdetox.pipeline.experiment import Experiment
from jaxdetox.pipeline.record import barrier


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


def run_export(exp: Experiment, stage: flow.Stage) -> None:
    """The run's final models: its LLM (and NADO) version into `final/`."""
    v = stage.input_versions
    export_final(exp, v["lm"], v.get("nado"))
