"""Stage 2, label: every constraint's oracle scores the completions of S_s (`label_stage`:
any store and oracle; `label`: the run's stage, recorded in the manifest). Labels persist per
batch; oracle failures are masked and retried by the next call, never counted as clean."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxdetox.data.sample_store import SampleStore
from jaxdetox.oracles import Oracle
from jaxdetox.pipeline import flow
from jaxdetox.pipeline.experiment import Experiment
from jaxdetox.pipeline.record import StageReport, run_stage


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


def label(exp: Experiment, iteration: int, samples: int) -> None:
    """Stage 2 run in `iteration`: every constraint's oracle labels S_{samples}."""

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


def run_label(exp: Experiment, stage: flow.Stage) -> None:
    """Stage 2: every constraint's oracle labels the stage's samples."""
    label(exp, stage.iteration, stage.input_versions["samples"])
