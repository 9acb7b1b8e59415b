"""Stage 1, sample: S_s drawn from an LLM version on its prompt block into the sample store
(`sample_stage`: any sampler and store; `sample`: the run's stage, recorded in the manifest).
Sampling persists as it goes and resumes where a crash left it: a committed chunk is never
recomputed, and a rerun of a finished stage does nothing."""

from __future__ import annotations

import dataclasses
import operator
import time
from typing import Any

import jax
import numpy as np

from jaxdetox.data.prompts import TokenizedPrompts
from jaxdetox.data.sample_store import SampleStore
from jaxdetox.lm import LanguageModel, lm_sampler
from jaxdetox.pipeline import flow
from jaxdetox.pipeline.experiment import Experiment
from jaxdetox.pipeline.record import StageReport, run_stage
from jaxdetox.sampling import Sampler, SamplingConfig, sample_batches


def sample_stage(
    sampler: Sampler,
    params: Any,
    prompts: TokenizedPrompts,
    store: SampleStore,
    iteration: int,
    config: SamplingConfig,
    *,
    tokenizer: Any,
    nado_params: Any = None,
    batch_size: int = 16,
    progress: bool = True,
    versions: dict[str, int] | None = None,
) -> StageReport:
    """Sample `config.num_samples` completions per prompt from `params` (a train state's LM
    parameters, or `lm_sampler`'s; NADO-guided with `nado_params`) into `store`.
    `versions` (e.g. `{"lm": 2}`: which model drew them) go into every chunk's metadata and
    the stage's done record.

    Runs `sample_batches` and commits each batch as one chunk as it comes; every process
    commits its share of the batch's prompts under a chunk name with its process index.
    Prompts whose samples are already committed for `iteration` are skipped. Draws are
    seeded by the prompt's position in `prompts`, so a resumed run gives the same samples.
    """
    stage = "sampled"
    if store.is_done(iteration, stage):
        return StageReport(stage, 0, len(prompts), 0.0)
    done = set(store.done_prompt_ids(iteration).tolist())
    skip = [i for i, pid in enumerate(prompts.ids) if int(pid) in done]
    process, processes = jax.process_index(), jax.process_count()
    k, new_tokens, start = config.num_samples, 0, time.perf_counter()
    batches = sample_batches(
        sampler, params, prompts.tokens, config, batch_size=batch_size,
        nado_params=nado_params, skip=skip, progress=progress, description="sample",
    )  # fmt: skip
    for index_b, out in batches:
        new_tokens += int(out.lengths.sum())
        mine_b = np.arange(len(index_b))[process::processes]  # this process's prompts
        if not len(mine_b):
            continue
        rows = (mine_b[:, None] * k + np.arange(k)).reshape(-1)  # their rows in `out`
        out = jax.tree.map(operator.itemgetter(rows), out)
        prompt_rows = np.repeat(index_b[mine_b], k)
        store.write_samples(
            iteration,
            f"prompts-{int(index_b[0]):06d}-{len(index_b):04d}-p{process:03d}",
            prompt_ids=prompts.ids[prompt_rows],
            sample_index=np.tile(np.arange(k), len(mine_b)),
            prompt_tokens=[prompts.tokens[i] for i in prompt_rows],
            completion_tokens=out.tokens,
            completion_lengths=out.lengths,
            prompt_texts=[prompts.texts[i] for i in prompt_rows],
            completion_texts=tokenizer.batch_decode(
                [t[:n] for t, n in zip(out.tokens, out.lengths)], skip_special_tokens=True
            ),
            sampling_logprobs=out.logprobs,
            model_logprobs=out.model_logprobs,
            base_logprobs=out.base_logprobs,
            metadata={
                "sampling": dataclasses.asdict(config),
                "guided": nado_params is not None,
                "versions": versions or {},
            },
        )
    seconds = time.perf_counter() - start
    info = {"new_tokens": new_tokens, "compiles": sampler.compile_count, "versions": versions or {}}
    store.mark_done(iteration, stage, {"prompts": len(prompts), **info})
    return StageReport(stage, len(prompts) - len(skip), len(skip), seconds, info)


def sample_stage_lm(
    lm: LanguageModel,
    prompts: TokenizedPrompts,
    store: SampleStore,
    iteration: int,
    config: SamplingConfig,
    *,
    nado: Any = None,
    batch_size: int = 16,
    progress: bool = True,
) -> StageReport:
    """`sample_stage` for a `LanguageModel` (and optional NADO module): its cached sampler,
    parameters and tokenizer."""
    sampler, params, nado_params = lm_sampler(lm, nado)
    return sample_stage(
        sampler, params, prompts, store, iteration, config, tokenizer=lm.tokenizer,
        nado_params=nado_params, batch_size=batch_size, progress=progress,
    )  # fmt: skip


def sample(exp: Experiment, iteration: int, lm_version: int, samples: int, block: int) -> None:
    """Stage 1 run in `iteration`: S_{samples} from LLM_{lm_version} on prompt block `block`
    (0-based; every sample version has its own block). The store records LLM_{lm_version}."""

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


def sampled_by(exp: Experiment, samples: int) -> int | None:
    """The LLM version the sample store records as having drawn S_{samples} (None: none)."""
    info = exp.store.done_info(samples, "sampled") or {}
    return info.get("versions", {}).get("lm")


def run_sample(exp: Experiment, stage: flow.Stage) -> None:
    """Stage 1: the stage's sample version drawn from its LLM on its prompt block."""
    sample(exp, stage.iteration, stage.input_versions["lm"], stage.output[1], stage.block)
