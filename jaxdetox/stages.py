"""Pipeline stages 1 and 2 (sample, label; docs/method.md): sample completions into the sample
store, then label them with an oracle. Both persist as they go and resume where a crash left
them: a committed chunk is never recomputed, and a rerun of a finished stage does nothing.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxdetox.data.prompts import TokenizedPrompts
from jaxdetox.data.sample_store import SampleStore
from jaxdetox.oracles import Oracle
from jaxdetox.sampling import SamplingConfig


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
    lm: Any,
    prompts: TokenizedPrompts,
    store: SampleStore,
    iteration: int,
    config: SamplingConfig,
    *,
    batch_size: int = 16,
    nado: Any = None,
    progress: bool = True,
) -> StageReport:
    """Sample `config.num_samples` completions per prompt with `lm` (optionally NADO-guided)
    and commit them to `store`, one chunk per batch of prompts.

    Prompts whose samples are already committed for `iteration` are skipped. Draws are seeded
    by the prompt's index in `prompts`, so a resumed run gives the same completions.
    """
    from jaxdetox.sampling import lm_sampler

    stage = "sampled"
    if store.is_done(iteration, stage):
        return StageReport(stage, 0, len(prompts), 0.0)
    done = set(store.done_prompt_ids(iteration).tolist())
    todo = [i for i, pid in enumerate(prompts.ids) if int(pid) not in done]
    # Longest first: similar lengths share a padding bucket, so less padding per batch.
    todo.sort(key=lambda i: -len(prompts.tokens[i]))
    sampler, params, nado_params = lm_sampler(lm, nado)
    k, new_tokens, start = config.num_samples, 0, time.perf_counter()
    with tqdm(
        total=len(prompts), initial=len(prompts) - len(todo), desc="sample", unit="prompt",
        disable=not progress,
    ) as bar:  # fmt: skip
        for begin in range(0, len(todo), batch_size):
            index = np.asarray(todo[begin : begin + batch_size])
            out = sampler.sample(
                params,
                [prompts.tokens[i] for i in index],
                config,
                nado_params=nado_params,
                prompt_ids=index,
                batch_size=batch_size,
            )
            lengths = np.asarray(out.lengths)
            tokens = np.asarray(out.tokens)
            rows = np.repeat(index, k)
            store.write_samples(
                iteration,
                f"prompts-{int(index[0]):06d}-{len(index):04d}",
                prompt_ids=prompts.ids[rows],
                sample_index=np.tile(np.arange(k), len(index)),
                prompt_tokens=[prompts.tokens[i] for i in rows],
                completion_tokens=tokens,
                completion_lengths=lengths,
                prompt_texts=[prompts.texts[i] for i in rows],
                completion_texts=lm.tokenizer.batch_decode(
                    [t[:n] for t, n in zip(tokens, lengths)], skip_special_tokens=True
                ),
                sampling_logprobs=np.asarray(out.logprobs),
                model_logprobs=np.asarray(out.model_logprobs),
                base_logprobs=None if out.base_logprobs is None else np.asarray(out.base_logprobs),
                metadata={"sampling": dataclasses.asdict(config), "guided": nado is not None},
            )
            new_tokens += int(lengths.sum())
            bar.update(len(index))
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.1f}")
    seconds = time.perf_counter() - start
    info = {"new_tokens": new_tokens, "compiles": sampler.compile_count}
    store.mark_done(iteration, stage, {"prompts": len(prompts), **info})
    return StageReport(stage, len(todo), len(prompts) - len(todo), seconds, info)


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
