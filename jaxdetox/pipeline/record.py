"""Running a stage under its manifest record: a stage whose record is `done` is skipped (its
artefact is restored when a later stage needs it), a started one must consume the same
versions, one that raises is recorded `failed` (so the roles waiting for it stop too), and a
finished one is recorded `done` with its outputs once every process has finished it.
Rerunning the same command therefore resumes a run."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import multihost_utils

from jaxdetox.pipeline.experiment import Experiment

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StageReport:
    """What one stage call did: items processed now, items found already done, seconds."""

    stage: str
    processed: int
    skipped: int
    seconds: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


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
