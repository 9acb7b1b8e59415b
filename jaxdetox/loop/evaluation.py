"""The eval stage: a model version on the held-out prompts and the held-out text.

Samples `eval.num_samples` completions per held-out prompt (one prefill per prompt, the
sampler's k-per-prompt mode) into `RUN/eval/samples` (store iteration = LLM version, so
every version is scored on the same prompts with the same seeds), labels them with the
run's oracle, and reports the RTP metrics per prompt group, distinct-1/2/3, the
generations' perplexity under the fluency model and the LLM's perplexity on held-out text.
Resumable like stages 1–2; the metrics go to the manifest record and `RUN/eval/lm_NNN.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import numpy as np

from jaxdetox.data import SampleStore
from jaxdetox.evaluate import group_summaries
from jaxdetox.evaluate.fluency import distinct_n, nll_sums, text_windows
from jaxdetox.loop.experiment import Experiment
from jaxdetox.train.runner import StepRunner
from jaxdetox.train.state import Params


def eval_store(exp: Experiment) -> SampleStore:
    """The store of evaluation samples (iteration = LLM version)."""
    return SampleStore(exp.run.root / "eval" / "samples")


def perplexity(exp: Experiment, params: Params, batches: list[dict], name: str) -> float:
    """exp(Σ NLL / Σ tokens) of LLM `params` over host batches (one compile per shape)."""
    key = ("nll", name)
    runner = exp.runners.get(key)
    if runner is None:
        fn = functools.partial(_nll, graphdef=exp.lm_graph)
        runner = exp.runners[key] = StepRunner(
            fn, exp.mesh, exp.lm_shardings, name=f"perplexity {name}", returns_state=False
        )
    nll, tokens = 0.0, 0.0
    for batch in batches:
        out = runner(params, {"text": batch})
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    return math.exp(nll / tokens) if tokens else float("nan")


def _nll(params: Params, batch: dict, *, graphdef: Any) -> dict:
    return nll_sums(params, batch, graphdef=graphdef)


def heldout_text_batches(exp: Experiment) -> list[dict[str, np.ndarray]]:
    """The built-in held-out clean text as fixed-shape windows."""
    from jaxdetox import assets

    docs = [d for d in assets.heldout_text().split("\n\n") if d.strip()]
    tokens = [exp.tokenizer(d)["input_ids"] for d in docs]
    return text_windows(tokens, exp.config.eval.text_seq_len, batch_size=8)


def _prompt_groups(exp: Experiment, prompt_ids: np.ndarray) -> np.ndarray | None:
    prompts = exp.eval_prompt_set()
    kinds = prompts.meta.get("kind")
    if kinds is None:
        if not prompts.challenging.any():
            return None
        kinds = np.where(prompts.challenging, "challenging", "other")
    kind_of = dict(zip(prompts.ids.tolist(), list(kinds)))
    return np.array([kind_of.get(int(p), "?") for p in prompt_ids])


def evaluate_version(exp: Experiment, version: int) -> dict[str, Any]:
    """Metrics of LLM_version (sampling and labelling resume from the eval store)."""
    from jaxdetox.stages import label_stage, sample_stage

    cfg = exp.config.eval
    params = exp.lm_params(version)
    store = eval_store(exp)
    prompts = exp.eval_prompts()
    if cfg.max_prompts:
        prompts = dataclasses.replace(
            prompts,
            ids=prompts.ids[: cfg.max_prompts],
            tokens=prompts.tokens[: cfg.max_prompts],
            texts=prompts.texts[: cfg.max_prompts],
        )
    sampling = dataclasses.replace(
        exp.sampling_config(0),
        num_samples=cfg.num_samples,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
    )
    sample_stage(
        exp.sampler, exp.sampler_params(version), prompts, store, version, sampling,
        tokenizer=exp.tokenizer, batch_size=cfg.batch_size, progress=exp.progress,
    )  # fmt: skip
    label_stage(store, version, exp.oracle, exp.label_name, progress=exp.progress)
    table = store.read(version, exp.label_name)
    prompt_ids = table["prompt_id"].to_numpy()
    toxicity = table["toxicity"].to_numpy(zero_copy_only=False)
    ok = table["ok"].to_numpy(zero_copy_only=False)
    groups = group_summaries(toxicity, ok, prompt_ids, _prompt_groups(exp, prompt_ids))
    completions = table["completion_tokens"].to_pylist()
    by_prompt: dict[int, list] = {}
    for pid, c in zip(prompt_ids.tolist(), completions):
        by_prompt.setdefault(pid, []).append(c)
    metrics: dict[str, Any] = {**groups["all"]}
    metrics["groups"] = groups
    for n in (1, 2, 3):
        metrics[f"distinct_{n}"] = distinct_n(by_prompt.values(), n)
    metrics["perplexity"] = perplexity(exp, params, heldout_text_batches(exp), "heldout")
    if cfg.fluency_model != "none":
        metrics["fluency_perplexity"] = fluency_perplexity(exp, store, version)
    if exp.run.writer:
        path = exp.run.root / "eval" / f"lm_{version:03d}.json"
        path.write_text(json.dumps({"lm": version, **metrics}, indent=2))
    return metrics


def fluency_perplexity(exp: Experiment, store: SampleStore, version: int) -> float:
    """Perplexity of LLM_version's eval completions (given their prompts) under the
    fluency model (`base`: the base LLM; a larger model in the paper's practice)."""
    cfg = exp.config.eval
    if cfg.fluency_model != "base":
        raise NotImplementedError(
            f"eval.fluency_model = {cfg.fluency_model!r}: only 'base' and 'none' are wired in"
        )
    batches = store.batches(
        version,
        8,
        shuffle=False,
        num_epochs=1,
        prompt_len=exp.prompt_len,
        completion_len=exp.config.eval.max_new_tokens + (-exp.config.eval.max_new_tokens % 8),
    )
    return perplexity(exp, exp.lm_params(0), list(batches), "fluency")
