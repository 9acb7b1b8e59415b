"""Pipeline stages 1 and 2 (sample, label; docs/method.md): sample completions into the sample
store, then label them with an oracle. Both persist as they go and resume where a crash left
them: a committed chunk is never recomputed, and a rerun of a finished stage does nothing.
"""

from __future__ import annotations

import dataclasses
import operator
import re
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxdetox.data.prompts import TokenizedPrompts
from jaxdetox.data.sample_store import SampleStore
from jaxdetox.lm import LanguageModel, lm_sampler
from jaxdetox.oracles import Oracle
from jaxdetox.sampling import Sampler, SamplingConfig, sample_batches


@dataclasses.dataclass(frozen=True)
class StageReport:
    """What one stage call did: items processed now, items found already done, seconds."""

    stage: str
    processed: int
    skipped: int
    seconds: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def oracle_label_name(name: str) -> str:
    """The sample-store label key for an oracle name (`hf:/a/b` -> `hf_a_b`)."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_") or "oracle"


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


def label_stage(
    store: SampleStore,
    iteration: int,
    oracle: Oracle,
    label_name: str,
    *,
    batch_size: int = 256,
    max_attempts: int | None = None,
    progress: bool = True,
) -> StageReport:
    """Score every completion of `iteration` that has no good label yet and commit the labels
    per batch; `extra["failures_left"]` counts the completions still without a good label.

    Oracle failures are committed as `ok=False` (masked downstream, never clean) and retried
    by the next call, which scores exactly the failed and missing ones; a good label is
    never rescored. The stage is marked done once no failure is left, or, with
    `max_attempts`, once every failed completion has had that many attempts (its failure
    then stays masked).
    """
    stage = f"labelled-{label_name}"
    if store.is_done(iteration, stage):
        ok = store.read(iteration, label_name)["ok"].to_numpy(zero_copy_only=False)
        return StageReport(stage, 0, len(ok), 0.0, {"failures_left": int((~ok).sum())})
    before = store.label_attempts(iteration, label_name)
    keys = zip(before["prompt_id"].to_pylist(), before["sample_index"].to_pylist())
    tries = dict(zip(keys, before["attempts"].to_pylist()))
    todo = store.unlabelled(iteration, label_name, max_attempts=max_attempts)
    skipped = int(_settled(before, max_attempts).sum())
    start, failures = time.perf_counter(), 0
    with tqdm(total=todo.num_rows, desc="label", unit="text", disable=not progress) as bar:
        for begin in range(0, todo.num_rows, batch_size):
            part = todo.slice(begin, batch_size)
            prompt_ids = part["prompt_id"].to_numpy()
            sample_index = part["sample_index"].to_numpy()
            toxicity, ok = oracle.score(part["completion_text"].to_pylist())
            first = (int(prompt_ids[0]), int(sample_index[0]))
            # A retry of a failed first row needs a new chunk name (the store is append-only).
            attempt = tries.get(first, 0) + 1
            store.write_labels(
                iteration,
                f"{first[0]}-{first[1]}" + (f"-try{attempt}" if attempt > 1 else ""),
                oracle=label_name,
                prompt_ids=prompt_ids,
                sample_index=sample_index,
                toxicity=toxicity,
                ok=ok,
                metadata={"oracle_id": oracle.oracle_id},
            )
            failures += int((~np.asarray(ok)).sum())
            bar.update(part.num_rows)
    seconds = time.perf_counter() - start
    after = store.label_attempts(iteration, label_name)
    total = todo.num_rows + skipped
    failures_left = total - int(after["ok"].to_numpy(zero_copy_only=False).sum())
    info = {"oracle_id": oracle.oracle_id, "failures": failures, "failures_left": failures_left}
    if int(_settled(after, max_attempts).sum()) == total:
        store.mark_done(iteration, stage, info)
    return StageReport(stage, todo.num_rows, skipped, seconds, info)


def _settled(labels: Any, max_attempts: int | None) -> np.ndarray:
    """Which of `SampleStore.label_attempts` rows are not to be scored again."""
    ok = labels["ok"].to_numpy(zero_copy_only=False)
    if max_attempts is None:
        return ok
    return ok | (labels["attempts"].to_numpy() >= max_attempts)
