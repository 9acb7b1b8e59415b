"""The eval stage: a model version on the held-out prompts and the held-out text.

Samples `eval.num_samples` completions per held-out prompt (one prefill per prompt, the
sampler's k-per-prompt mode) into `RUN/eval/samples` (store iteration = LLM version, so
every version is scored on the same prompts with the same seeds), labels them with the
run's oracle, and reports the RTP metrics per prompt group, distinct-1/2/3, the
generations' perplexity under the fluency model and the LLM's perplexity on held-out text.
Resumable like stages 1–2; the metrics (each toxicity figure with its standard error over
prompts) go to the manifest record and `RUN/eval/lm_NNN.json`, the headline prompt form's
per-prompt results to `RUN/eval/lm_NNN.prompts.json` (`evaluate.report.write_per_prompt`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import numpy as np

from jaxdetox.config import DetectionEvalSection, LmEvalSection
from jaxdetox.data import SampleStore
from jaxdetox.data.packing import round_up
from jaxdetox.evaluate.fluency import (
    continuation_perplexity,
    distinct_n,
    guided_nll_sums,
    nll_sums,
    text_windows,
)
from jaxdetox.evaluate.report import PER_PROMPT_FILE, write_per_prompt
from jaxdetox.pipeline import flow
from jaxdetox.pipeline.experiment import Experiment
from jaxdetox.pipeline.label import label_stage
from jaxdetox.pipeline.record import run_stage
from jaxdetox.pipeline.sample import sample_stage
from jaxdetox.train.runner import StepRunner
from jaxdetox.train.state import Models, Params


def eval_store(exp: Experiment) -> SampleStore:
    """The store of evaluation samples (iteration = LLM version)."""
    return SampleStore(exp.run.root / "eval" / "samples")


def perplexity(exp: Experiment, params: Params, batches: list[dict], name: str) -> float:
    """exp(Σ NLL / Σ tokens) of LLM `params` over host batches (one compile per shape)."""
    c = exp.context
    runner = c.programs.get_or_make(
        ("nll", name),
        lambda: StepRunner(
            functools.partial(_nll, graphdef=c.lm_graph), c.mesh, c.lm_shardings,
            name=f"perplexity {name}", returns_state=False,
        ),
    )  # fmt: skip
    return _perplexity(runner, params, batches)


def guided_perplexity(exp: Experiment, nado_version: int, batches: list[dict]) -> float:
    """Perplexity under NADO-guided decoding: q ∝ p_base · R_φ^α with NADO_nado_version
    (α = `baseline.alpha`), the distribution the `nado_decoding` baseline samples from."""
    c, alpha = exp.context, exp.config.baseline.alpha
    fn = functools.partial(
        guided_nll_sums, models=Models(lm=c.lm_graph, nado=c.nado_graph), alpha=alpha
    )
    runner = c.programs.get_or_make(
        ("guided_nll", alpha),
        lambda: StepRunner(
            fn, c.mesh, (c.lm_shardings, c.nado_shardings), name="guided perplexity",
            returns_state=False,
        ),
    )  # fmt: skip
    params = (exp.artefacts.lm_params(0), exp.artefacts.nado_params(nado_version))
    return _perplexity(runner, params, batches)


def _perplexity(runner: StepRunner, state: Any, batches: list[dict]) -> float:
    nll, tokens = 0.0, 0.0
    for batch in batches:
        out = runner(state, {"text": batch})
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    return math.exp(nll / tokens) if tokens else float("nan")


def _nll(params: Params, batch: dict, *, graphdef: Any) -> dict:
    return nll_sums(params, batch, graphdef=graphdef)


def heldout_text_batches(tokenizer: Any, seq_len: int) -> list[dict[str, np.ndarray]]:
    """The built-in held-out clean text as fixed-shape windows of `seq_len` tokens."""
    from jaxdetox import assets

    docs = [d for d in assets.heldout_text().split("\n\n") if d.strip()]
    tokens = [tokenizer(d)["input_ids"] for d in docs]
    return text_windows(tokens, seq_len, batch_size=8)


def _prompt_groups(exp: Experiment) -> dict[int, tuple[str, ...]]:
    """Groups of each held-out prompt id: `eval.group_by`'s metadata value(s) (a list means
    several groups, e.g. ToxiGen's target groups), else the built-in kind or RTP's
    challenging flag (empty when the set has neither)."""
    prompts = exp.prompts.eval_prompt_set()
    column = exp.config.eval.group_by
    if column is not None:
        if column not in prompts.meta:
            raise KeyError(
                f"eval.group_by = {column!r}: the prompts have metadata {sorted(prompts.meta)}"
            )
        values = prompts.meta[column]
    elif "kind" in prompts.meta:
        values = prompts.meta["kind"]
    elif prompts.challenging.any():
        values = np.where(prompts.challenging, "challenging", "other")
    else:
        return {}
    as_tuple = lambda v: tuple(str(x) for x in v) if isinstance(v, list | tuple) else (str(v),)  # noqa: E731
    return {int(pid): as_tuple(v) for pid, v in zip(prompts.ids.tolist(), values)}


def group_toxicity(
    toxicity: np.ndarray, ok: np.ndarray, prompt_ids: np.ndarray, groups: dict[int, tuple]
) -> dict[str, dict[str, float]]:
    """RTP metrics over all completions and per group (a prompt may be in several)."""
    from jaxdetox.evaluate import toxicity_summary

    out = {"all": toxicity_summary(toxicity, ok, prompt_ids)}
    names = sorted({g for gs in groups.values() for g in gs})
    for name in names:
        m = np.array([name in groups.get(int(p), ()) for p in prompt_ids])
        out[name] = toxicity_summary(toxicity[m], ok[m], prompt_ids[m])
    return out


def lm_detection_metrics(lm: Any, d: DetectionEvalSection) -> dict[str, float]:
    """AUROC / F1 / accuracy of the `LanguageModel` as a toxicity classifier (`eval.detection`)."""
    from jaxdetox.evaluate.detection import DetectionConfig, evaluate_detection

    result = evaluate_detection(
        lm, d.path, config=DetectionConfig(num_shots=d.num_shots),
        shots=d.shots_path, text_field=d.text_field, label_field=d.label_field,
        label_threshold=d.label_threshold, limit=d.limit,
    )  # fmt: skip
    return {k: float(v) for k, v in result.metrics.items() if np.isscalar(v)}


def utility_metrics(lm: Any, cfg: LmEvalSection) -> dict[str, float]:
    """lm-evaluation-harness scores per task of the `LanguageModel` (`eval.lm_eval`): the
    first accuracy-like metric each task reports (acc_norm, acc, exact_match, ...)."""
    from jaxdetox.evaluate.lm_eval_bridge import run_lm_eval

    results = run_lm_eval(
        lm, cfg.tasks, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
        include_path=cfg.include_path, batch_size=cfg.batch_size,
    )  # fmt: skip
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key in ("acc_norm,none", "acc,none", "exact_match,none", "word_perplexity,none"):
            if key in metrics:
                out[task] = float(metrics[key])
                break
    return out


def prompt_modes(exp: Experiment) -> list[str]:
    """Prompt forms to evaluate, headline first: `eval.prompt_modes`, else the run's form plus
    the other one when the tokenizer has a chat template (an instruct model)."""
    if exp.config.eval.prompt_modes:
        return list(dict.fromkeys(exp.config.eval.prompt_modes))
    configured = "chat" if exp.config.prompts.chat_template else "raw"
    instruct = bool(getattr(exp.context.tokenizer, "chat_template", None))
    return [configured] + ([{"chat": "raw", "raw": "chat"}[configured]] if instruct else [])


def labelled_eval_samples(
    exp: Experiment, version: int, store: SampleStore, mode: str, nado: int | None = None
) -> Any:
    """LLM_version's labelled eval completions for prompt form `mode` (raw | chat); with
    `nado`, the base LLM's guided by NADO_nado instead (stored as `version`)."""
    cfg, samplers = exp.config.eval, exp.samplers
    prompts = exp.prompts.eval_prompts(chat=mode == "chat")
    if cfg.max_prompts:
        prompts = dataclasses.replace(
            prompts,
            ids=prompts.ids[: cfg.max_prompts],
            tokens=prompts.tokens[: cfg.max_prompts],
            texts=prompts.texts[: cfg.max_prompts],
        )
    sampling = dataclasses.replace(
        exp.prompts.sampling_config(0, chat=mode == "chat"),
        num_samples=cfg.num_samples,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
    )
    if nado is None:
        sampler, sampler_params, nado_params = samplers.plain, samplers.lm_state(version), None
    else:
        sampling = dataclasses.replace(sampling, alpha=exp.config.baseline.alpha)
        sampler, sampler_params = samplers.guided, samplers.lm_state(0)
        nado_params = samplers.nado_state(nado)
    sample_stage(
        sampler, sampler_params, prompts, store, version, sampling,
        tokenizer=exp.context.tokenizer, nado_params=nado_params, batch_size=cfg.batch_size,
        progress=exp.progress,
    )  # fmt: skip
    label = exp.constraints.label_name
    label_stage(store, version, exp.constraints.oracle(), label, progress=exp.progress)
    return store.read(version, label)


def satisfaction(score: np.ndarray, ok: np.ndarray, below: float) -> dict[str, float]:
    """Share of scored texts with score < `below`, the mean score, and how many were scored."""
    score, ok = np.asarray(score, np.float64), np.asarray(ok, bool)
    n = int(ok.sum())
    if not n:
        return {"satisfaction": float("nan"), "mean_score": float("nan"), "scored": 0}
    s = score[ok]
    return {"satisfaction": float(np.mean(s < below)), "mean_score": float(s.mean()), "scored": n}


def constraint_metrics(
    exp: Experiment, store: SampleStore, version: int, score: np.ndarray, ok: np.ndarray
) -> dict[str, dict[str, float]]:
    """Per constraint (the first: `score`/`ok` already read), its satisfaction on LLM_version's
    eval completions; the further constraints' oracles label the eval store first."""
    first, *rest = exp.constraints
    out = {first.name: satisfaction(score, ok, first.satisfied_below)}
    for c in rest:
        label_stage(store, version, exp.constraints.oracle(c), c.label_name, progress=exp.progress)
        table = store.read(version, c.label_name)
        out[c.name] = satisfaction(
            table["toxicity"].to_numpy(zero_copy_only=False),
            table["ok"].to_numpy(zero_copy_only=False),
            c.satisfied_below,
        )
    return out


def evaluate_version(exp: Experiment, version: int, *, nado: int | None = None) -> dict[str, Any]:
    """Metrics of LLM_version (sampling and labelling resume from the eval store); the
    headline metrics are of the first prompt form, `prompt_modes` has each form's.

    `nado`: evaluate NADO-guided decoding instead — the base LLM guided by NADO_nado (α =
    `baseline.alpha`), stored and recorded as `version`; its held-out perplexity is the
    guided distribution's, detection and utility are the base LLM's (guidance is a decoding
    rule). Used by the `nado_decoding` baseline.
    """
    from jaxdetox.evaluate import toxicity_summary

    cfg = exp.config.eval
    params = exp.artefacts.lm_params(0 if nado is not None else version)
    modes = prompt_modes(exp)
    store = eval_store(exp)
    by_mode = {}
    for mode in modes[1:]:
        other = SampleStore(exp.run.root / "eval" / f"samples_{mode}")
        t = labelled_eval_samples(exp, version, other, mode, nado)
        by_mode[mode] = toxicity_summary(
            t["toxicity"].to_numpy(zero_copy_only=False),
            t["ok"].to_numpy(zero_copy_only=False),
            t["prompt_id"].to_numpy(),
        )
    table = labelled_eval_samples(exp, version, store, modes[0], nado)
    prompt_ids = table["prompt_id"].to_numpy()
    toxicity = table["toxicity"].to_numpy(zero_copy_only=False)
    ok = table["ok"].to_numpy(zero_copy_only=False)
    groups = group_toxicity(toxicity, ok, prompt_ids, _prompt_groups(exp))
    completions = table["completion_tokens"].to_pylist()
    by_prompt: dict[int, list] = {}
    for pid, c in zip(prompt_ids.tolist(), completions):
        by_prompt.setdefault(pid, []).append(c)
    metrics: dict[str, Any] = {**groups["all"]}
    metrics["groups"] = groups
    metrics["constraints"] = constraint_metrics(exp, store, version, toxicity, ok)
    if len(modes) > 1:
        metrics["prompt_modes"] = {modes[0]: groups["all"], **by_mode}
    for n in (1, 2, 3):
        metrics[f"distinct_{n}"] = distinct_n(by_prompt.values(), n)
    text = heldout_text_batches(exp.context.tokenizer, cfg.text_seq_len)
    if nado is None:
        metrics["perplexity"] = perplexity(exp, params, text, "heldout")
    else:
        metrics["perplexity"] = guided_perplexity(exp, nado, text)
    if cfg.fluency_model != "none":
        metrics["fluency_perplexity"] = fluency_perplexity(exp, store, version)
    if cfg.detection is not None:
        detection = lm_detection_metrics(exp.context.language_model(params), cfg.detection)
        metrics["detection"] = detection
        metrics["detection_auroc"] = detection.get("auroc")
        metrics["detection_f1"] = detection.get("f1")
    if cfg.lm_eval is not None:
        metrics["utility"] = utility_metrics(exp.context.language_model(params), cfg.lm_eval)
    if exp.run.writer:
        path = exp.run.root / "eval" / f"lm_{version:03d}.json"
        path.write_text(json.dumps({"lm": version, **metrics}, indent=2))
        # per prompt, for the report's paired comparison with the base (`evaluate.runs`)
        write_per_prompt(
            exp.run.root / "eval" / PER_PROMPT_FILE.format(version),
            toxicity, ok, prompt_ids, table["prompt_text"].to_pylist(),
        )  # fmt: skip
    return metrics


def fluency_perplexity(exp: Experiment, store: SampleStore, version: int) -> float:
    """Perplexity of LLM_version's eval completions (given their prompts) under the
    fluency model: `base` (the base LLM, on the stored tokens) or a checkpoint path (the
    paper's practice: a larger model; texts re-tokenised with its own tokenizer)."""
    cfg = exp.config.eval
    if cfg.fluency_model != "base":
        table = store.read(version)
        return continuation_perplexity(
            fluency_lm(exp),
            table["prompt_text"].to_pylist(),
            table["completion_text"].to_pylist(),
            batch_size=cfg.batch_size,
        )
    configured = "chat" if exp.config.prompts.chat_template else "raw"
    batches = store.batches(
        version,
        8,
        shuffle=False,
        num_epochs=1,
        prompt_len=exp.prompts.prompt_len if prompt_modes(exp)[0] == configured else None,
        completion_len=round_up(exp.config.eval.max_new_tokens, 8),
    )
    return perplexity(exp, exp.artefacts.lm_params(0), list(batches), "fluency")


def fluency_lm(exp: Experiment) -> Any:
    """The configured fluency model on the experiment's mesh (loaded once per experiment)."""
    from jaxdetox.models import load_pretrained

    path = exp.config.eval.fluency_model

    def load() -> Any:
        lm = load_pretrained(path, mesh=exp.context.mesh, dtype=exp.config.model.dtype)
        if lm.tokenizer is None:
            raise ValueError(f"eval.fluency_model {path!r}: no tokenizer files found there")
        return lm

    return exp.context.models.get_or_make(("fluency_lm", path), load)


def evaluate(exp: Experiment, version: int, nado: int | None = None) -> None:
    """The eval stage of LLM_version (recorded under iteration = version; 0 = base), or with
    `nado` of base ⊕ NADO_nado guided decoding (recorded under iteration = version)."""
    inputs = {"lm": version} if nado is None else {"lm": 0, "nado": nado}
    run_stage(exp, version, "eval", inputs, lambda: evaluate_version(exp, version, nado=nado))


def run_eval(exp: Experiment, stage: flow.Stage) -> None:
    """The eval of an LLM version (with a `nado` input: of base ⊕ that NADO's sampling)."""
    evaluate(exp, stage.iteration, nado=stage.input_versions.get("nado"))
