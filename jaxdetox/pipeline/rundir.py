"""The run directory: resolved config, manifest of stage records, metrics, artefact paths.

    RUN/config.yaml           the resolved config (a rerun must match it)
    RUN/manifest.json         [{"iteration", "stage", "status", "inputs", "outputs", "seconds",
                                "started", "role", "devices", "device_seconds"}]
    RUN/metrics.jsonl         one JSON object per logged step
    RUN/tensorboard/          the same scalars as TensorBoard events
    RUN/samples/              the sample store (every iteration's samples and labels)
    RUN/iter_003/train_nado/  a training stage's output (artifact/) and, while it runs, its
                              resume checkpoints (ckpt*/: deleted once the stage is done,
                              unless loop.keep_stage_checkpoints)
    RUN/final/model/          the final LLM as an HF checkpoint; RUN/final/nado/ the NADO

Stage `inputs` name the iteration whose artefact the stage consumed: `lm` (0 = the base
LLM), `nado` (0 = the initial NADO), `samples`. Only process 0 writes the manifest and the
logs; every write is atomic (temp file + rename; on object stores one whole-object upload), so
a kill never leaves a torn file. The root may be local or any `etils.epath` path (`gs://...`).

With the `jobs` placement each role is its own program writing its own files —
`manifest.<role>.json`, `metrics.<role>.jsonl`, `tensorboard/<role>/` — so no two programs
ever write one file (which no shared filesystem or object store would make safe); readers
merge them, and the role that finishes last writes the merged `manifest.json`. Threads of
one program (the `split` placement) share one `RunDir`, whose writes take a lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from typing import Any

import jax
from etils.epath import Path

from jaxdetox import fileio
from jaxdetox.errors import JaxdetoxError

STAGES = ("sample", "label", "train_nado", "finetune", "eval")
# A training stage's resume checkpoints: `ckpt/`, and `ckpt_<constraint>/` for further NADOs.
CHECKPOINTS = "ckpt"


_atomic_write = fileio.atomic_write_text  # temp names carry pid + a random suffix

CONFIG_FILE = "config.yaml"  # the resolved config, saved when the run starts
# What marks a folder as a run directory of this project (`jaxdetox run`, `eval`).
RUN_MARKERS = (CONFIG_FILE, "manifest.json")


def _diff(a: object, b: object, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def config_diff(saved: dict, config: Any, out: Path) -> str:
    """Why `config` may not resume the run in `out` that saved `saved` ("" if it may): the
    differing keys, both through the current schema (defaults added since compare equal)."""
    from jaxdetox.config import config_from_dict

    # Only compared: the saved method's rules are not checked again (a new one differs).
    saved_config = config_from_dict(saved, str(out / CONFIG_FILE), executes=False)
    before = saved_config.model_dump(mode="json")
    diff = _diff(before, config.model_dump(mode="json"))
    if not diff:
        return ""
    return (
        f"{out} was started with a different config ({len(diff)} keys differ, saved -> now); "
        "use a new --out directory, or rerun with the saved config:\n  " + "\n  ".join(diff)
    )


class RunDirError(JaxdetoxError, ValueError):
    """An output folder that cannot be used: a file, not writable, or an existing folder
    with other files than this project's (refused unless `--overwrite`)."""


def _has_marker(path: Path, markers: tuple[str, ...]) -> bool:
    return any((path / m).exists() for m in markers)


def is_run_dir(
    path: str | os.PathLike[str], markers: tuple[str, ...] = RUN_MARKERS, *, nested: bool = False
) -> bool:
    """Whether `path` is an output of this project: it holds one of `markers` (or, `nested`,
    one of its subfolders does: a demo's or an experiment's folder of run directories)."""
    path = fileio.as_path(path)
    if _has_marker(path, markers):
        return True
    return nested and any(c.is_dir() and _has_marker(c, markers) for c in path.iterdir())


def check_out(
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    markers: tuple[str, ...] = RUN_MARKERS,
    nested: bool = False,
    flag: str = "--out",
) -> None:
    """Refuse `out` unless it is new, empty, or already an output of this project (one of
    `markers` there; `nested`: or in a subfolder): a user's own folder would get our files beside theirs (and a `samples/`
    of theirs would become the sample store). `overwrite` accepts any existing folder. A new
    local folder is created and removed again, so a path that cannot be made fails here,
    before a run spends a minute."""
    out = fileio.as_path(out)
    if out.exists():
        if not out.is_dir():
            raise RunDirError(f"{flag} {out}: is a file, not a folder")
        # Another program's atomic write in progress (a `jobs` role starting beside this
        # one) leaves `.NAME.tmp-*` for a moment: not the user's.
        entries = sorted(
            p.name + ("/" if p.is_dir() else "")
            for p in out.iterdir()
            if not (p.name.startswith(".") and ".tmp-" in p.name)
        )
        if entries and not overwrite and not is_run_dir(out, markers, nested=nested):
            shown = ", ".join(entries[:5]) + (
                f", ... ({len(entries)} in all)" if len(entries) > 5 else ""
            )
            raise RunDirError(
                f"{flag} {out}: exists and is not a jaxdetox output folder (it holds {shown}); "
                "choose a new folder, or pass --overwrite to write into it anyway"
            )
        return
    if fileio.is_local(out):
        _probe_create(os.fspath(out), flag)


def _probe_create(path: str, flag: str) -> None:
    """Make `path` (and missing parents), then remove what was made; `RunDirError` if it
    cannot be made. Another host probing the same shared path at once is no error."""
    missing = []
    head = os.path.abspath(path)
    while not os.path.exists(head):
        missing.append(head)
        head = os.path.dirname(head)
    if not os.path.isdir(head):
        raise RunDirError(f"{flag} {path}: {head} is a file, not a folder")
    created = []
    try:
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:
                continue
            created.append(folder)
    except OSError as e:
        raise RunDirError(f"{flag} {path}: cannot create it ({e.strerror})") from None
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def _stage_key(record: dict[str, Any]) -> tuple[int, int]:
    return record["iteration"], STAGES.index(record["stage"])


def read_manifest(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every stage record of the run in `root`: `manifest.json` merged with the per-role
    manifests of the `jobs` placement (a role's own record wins), in iteration order."""
    root = fileio.as_path(root)
    merged: dict[tuple[int, str], dict[str, Any]] = {}
    paths = [root / "manifest.json", *sorted(root.glob("manifest.*.json"))]
    for path in paths:
        if path.exists():
            for r in json.loads(path.read_text()):
                merged[r["iteration"], r["stage"]] = r
    return sorted(merged.values(), key=_stage_key)


class RunDir:
    """Paths and bookkeeping of one run directory (of one role, with the `jobs` placement)."""

    def __init__(self, root: str | os.PathLike[str], role: str | None = None) -> None:
        """Use (and create) `root`; `role` gives the role's own manifest and metrics files."""
        self.root = fileio.as_path(root)
        self.role = role
        self.writer = jax.process_index() == 0
        if self.writer:
            self.root.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._lock = threading.RLock()  # role threads of the `split` placement share this

    def _own(self, name: str, suffix: str) -> Path:
        return self.root / (f"{name}.{self.role}{suffix}" if self.role else f"{name}{suffix}")

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
        """The manifest this program writes: `manifest.json` (`manifest.<role>.json`)."""
        return self._own("manifest", ".json")

    def manifest(self) -> list[dict[str, Any]]:
        """All stage records of the run, every role's (empty for a new run)."""
        with self._lock:
            return read_manifest(self.root)

    def write_merged_manifest(self) -> None:
        """Write every role's records into `manifest.json` (the `jobs` placement's last role)."""
        if self.writer:
            text = json.dumps(self.manifest(), indent=2) + "\n"
            _atomic_write(self.root / "manifest.json", text)

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
        role: str | None = None,
        devices: int | None = None,
        started: float | None = None,
    ) -> None:
        """Create or replace the record of (iteration, stage) in this program's manifest.

        `devices`: how many devices the stage ran on; with `seconds` it gives the record's
        `device_seconds` (what the stage cost, whatever ran beside it). `started`: wall-clock
        start (epoch seconds); with `seconds` it places the stage on the run's timeline.
        """
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r}; expected one of {STAGES}")
        if not self.writer:
            return
        record = {
            "iteration": iteration,
            "stage": stage,
            "status": status,
            "inputs": inputs,
            "outputs": outputs or {},
            "seconds": None if seconds is None else round(float(seconds), 3),
            "started": None if started is None else round(started, 3),
            "role": role,
            "devices": devices,
            "device_seconds": (
                None if seconds is None or devices is None else round(seconds * devices, 3)
            ),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        with self._lock:
            own = json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else []
            records = [r for r in own if (r["iteration"], r["stage"]) != (iteration, stage)]
            records = sorted([*records, record], key=_stage_key)
            _atomic_write(self.manifest_path, json.dumps(records, indent=2) + "\n")

    def drop_stage_checkpoints(self, iteration: int, stage: str) -> None:
        """Delete a finished stage's resume checkpoints (`ckpt*/`: parameters + optimizer
        state every `checkpoint_every` steps); its artefact and records stay."""
        if not self.writer or not self.stage_dir(iteration, stage).exists():
            return
        for path in self.stage_dir(iteration, stage).glob(f"{CHECKPOINTS}*"):
            if path.is_dir():
                path.rmtree()

    def adopt(self, source: RunDir, iteration: int, stage: str) -> bool:
        """Take over `source`'s finished `stage` of `iteration`: its outputs (hard-linked
        where possible) and its record, marked `adopted_from`; a rerun of this run then skips
        the stage. For runs whose first stages are another run's by construction (same
        config and seed for them). Returns False when this run has the stage already."""
        record = source.record(iteration, stage)
        if record is None or record["status"] != "done":
            raise ValueError(f"{source.root}: {stage} of iteration {iteration} is not done")
        if self.is_done(iteration, stage):
            return False
        if self.writer:
            if source.stage_dir(iteration, stage).exists():
                fileio.copy_tree(
                    source.stage_dir(iteration, stage), self.stage_dir(iteration, stage), link=True
                )
            if stage in ("sample", "label"):  # both write into the store's iteration folder
                from jaxdetox.data.sample_store import SampleStore

                version = record["outputs"].get("samples", record["inputs"].get("samples"))
                theirs, ours = SampleStore(source.samples), SampleStore(self.samples)
                fileio.copy_tree(
                    theirs.iteration_dir(version), ours.iteration_dir(version), link=True
                )
        self.update_record(
            iteration, stage, status="done", inputs=record["inputs"],
            outputs={**record["outputs"], "adopted_from": str(source.root)},
            seconds=record["seconds"], role=record["role"], devices=record["devices"],
            started=record["started"],
        )  # fmt: skip
        return True

    # ------------------------------------------------------------------ metrics

    @property
    def metrics_path(self) -> Path:
        """The metrics file this program writes: `metrics.jsonl` (`metrics.<role>.jsonl`)."""
        return self._own("metrics", ".jsonl")

    def truncate_metrics(self, iteration: int, stage: str, after_step: int) -> None:
        """Drop logged steps of a stage beyond `after_step` (a resumed stage redoes them)."""
        if not self.writer or not self.metrics_path.exists():
            return
        with self._lock:
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
        with self._lock:
            fileio.append_text(self.metrics_path, json.dumps(record) + "\n")
            tb = self._tensorboard()
            for key, value in scalars.items():  # one curve per iteration, grouped by stage
                tb.add_scalar(f"{stage}/iter_{iteration:03d}/{key}", value, step)

    def metrics(self) -> list[dict[str, Any]]:
        """Every logged record (every role's)."""
        paths = [self.root / "metrics.jsonl", *sorted(self.root.glob("metrics.*.jsonl"))]
        return [
            json.loads(line)
            for path in paths
            if path.exists()
            for line in path.read_text().splitlines()
        ]

    def _tensorboard(self) -> Any:
        if self._tb is None:
            from tensorboardX import SummaryWriter

            logdir = fileio.tensorboard_dir(self.root / "tensorboard" / (self.role or ""))
            self._tb = SummaryWriter(logdir, flush_secs=10)
        return self._tb

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
