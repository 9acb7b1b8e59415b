"""The run directory: resolved config, manifest of stage records, metrics, artefact paths.

    RUN/config.yaml           the resolved config (a rerun must match it)
    RUN/manifest.json         [{"iteration", "stage", "status", "inputs", "outputs", "seconds"}]
    RUN/metrics.jsonl         one JSON object per logged step
    RUN/tensorboard/          the same scalars as TensorBoard events
    RUN/samples/              the sample store (every iteration's samples and labels)
    RUN/iter_003/train_nado/  orbax checkpoints of a training stage
    RUN/final/model/          the final LLM as an HF checkpoint; RUN/final/nado/ the NADO

Stage `inputs` name the iteration whose artefact the stage consumed: `lm` (0 = the base
LLM), `nado` (0 = the initial NADO), `samples`. Only process 0 writes the manifest and the
logs; every write is atomic (temp file + rename), so a kill never leaves a torn file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax

STAGES = ("sample", "label", "train_nado", "finetune", "eval")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    """Paths and bookkeeping of one run directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """Use (and create) `root`."""
        self.root = Path(root)
        self.writer = jax.process_index() == 0
        if self.writer:
            self.root.mkdir(parents=True, exist_ok=True)
        self._tb = None

    # ------------------------------------------------------------------ paths

    @property
    def samples(self) -> Path:
        """The sample store's root."""
        return self.root / "samples"

    def stage_dir(self, iteration: int, stage: str) -> Path:
        """Directory of one stage's checkpoints and outputs."""
        return self.root / f"iter_{iteration:03d}" / stage

    @property
    def final(self) -> Path:
        """Where the final exported models go."""
        return self.root / "final"

    # ------------------------------------------------------------------ manifest

    @property
    def manifest_path(self) -> Path:
        """`manifest.json`."""
        return self.root / "manifest.json"

    def manifest(self) -> list[dict[str, Any]]:
        """All stage records (empty for a new run)."""
        if not self.manifest_path.exists():
            return []
        return json.loads(self.manifest_path.read_text())

    def record(self, iteration: int, stage: str) -> dict[str, Any] | None:
        """The record of `stage` in `iteration`, if any."""
        for r in self.manifest():
            if r["iteration"] == iteration and r["stage"] == stage:
                return r
        return None

    def is_done(self, iteration: int, stage: str) -> bool:
        """Whether the stage finished in an earlier (or this) run."""
        r = self.record(iteration, stage)
        return r is not None and r["status"] == "done"

    def update_record(
        self,
        iteration: int,
        stage: str,
        *,
        status: str,
        inputs: dict[str, int | None],
        outputs: dict[str, Any] | None = None,
        seconds: float | None = None,
    ) -> None:
        """Create or replace the record of (iteration, stage) and write the manifest."""
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r}; expected one of {STAGES}")
        if not self.writer:
            return
        records = [
            r for r in self.manifest() if not (r["iteration"] == iteration and r["stage"] == stage)
        ]
        records.append(
            {
                "iteration": iteration,
                "stage": stage,
                "status": status,
                "inputs": inputs,
                "outputs": outputs or {},
                "seconds": None if seconds is None else round(float(seconds), 3),
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
        records.sort(key=lambda r: (r["iteration"], STAGES.index(r["stage"])))
        _atomic_write(self.manifest_path, json.dumps(records, indent=2) + "\n")

    # ------------------------------------------------------------------ metrics

    @property
    def metrics_path(self) -> Path:
        """`metrics.jsonl`."""
        return self.root / "metrics.jsonl"

    def truncate_metrics(self, iteration: int, stage: str, after_step: int) -> None:
        """Drop logged steps of a stage beyond `after_step` (a resumed stage redoes them)."""
        if not self.writer or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            r = json.loads(line)
            if r.get("iteration") == iteration and r.get("stage") == stage:
                if r.get("step", 0) > after_step:
                    continue
            kept.append(line)
        _atomic_write(self.metrics_path, "".join(k + "\n" for k in kept))

    def log(self, iteration: int, stage: str, step: int, scalars: dict[str, float]) -> None:
        """Append one metrics record (JSONL) and the same scalars to TensorBoard."""
        if not self.writer:
            return
        record = {"iteration": iteration, "stage": stage, "step": step, **scalars}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            for key, value in scalars.items():  # one curve per iteration, grouped by stage
                tb.add_scalar(f"{stage}/iter_{iteration:03d}/{key}", value, step)

    def metrics(self) -> list[dict[str, Any]]:
        """Every logged record."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines()]

    def _tensorboard(self) -> Any:
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.root / "tensorboard"), flush_secs=10)
        return self._tb

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
