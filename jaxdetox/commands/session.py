"""Opening and executing a run from the command line: config resolution (a rerun must use
the same resolved config), the run directory with its config saved, undoing a start that
failed before its first stage, logging, and `execute` — the method's plan through its
placement, for `jaxdetox run`, `demo` and `experiment`."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import jax
import yaml
from etils.epath import Path

from jaxdetox.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
)
from jaxdetox.fileio import atomic_write_text
from jaxdetox.pipeline.rundir import CONFIG_FILE, RunDir, config_diff, read_manifest


def resolve_run_config(
    config_path: str | None, out: Path, overrides: list[str], *, executes: bool = True
) -> RunConfig:
    """The run's config: from CONFIG (+ overrides), or the one saved in `out` when resuming
    (`executes=False`: its method is only a row label, `config.config_from_dict`).

    A rerun with a config that resolves differently from the saved one is refused, naming
    the keys that differ (a resumed run must not silently change its recipe).
    """
    saved_path = out / CONFIG_FILE
    saved = yaml.safe_load(saved_path.read_text()) if saved_path.exists() else None
    if config_path is None and saved is None:
        raise ConfigError(f"{out}: no {CONFIG_FILE} there; pass a CONFIG.yaml to start a run")
    if config_path is None:
        data = apply_overrides(saved, overrides)
        config = config_from_dict(data, str(saved_path), executes=executes)
    else:
        config = load_config(config_path, overrides, executes=executes)
    if saved is not None:
        differences = config_diff(saved, config, out)
        if differences:
            raise ConfigError(differences)
    return config


def open_run(config: RunConfig, out: Path, role: str | None = None) -> RunDir:
    """The run directory with the resolved config saved (process 0 writes; atomically, as
    the roles of a `jobs` run may start together)."""
    run = RunDir(out, role=role)
    if run.writer and not (out / CONFIG_FILE).exists():
        atomic_write_text(out / CONFIG_FILE, dump_config(config))
    return run


def _has_records(out: Path) -> bool:
    """Whether a stage of the run in `out` (or of a λ sweep's runs in its subfolders) began."""
    if read_manifest(out):
        return True
    return out.is_dir() and any(c.is_dir() and read_manifest(c) for c in out.iterdir())


@contextlib.contextmanager
def undo_failed_start(out: Path, *, role: str | None = None) -> Iterator[None]:
    """Around a run's start-up and stages: if the body raises before any stage was
    recorded (the model did not load, a file was missing...), remove the `config.yaml` this
    start wrote (and `out` itself, if it made it and it is empty), so the corrected command
    is not refused as "started with a different config". Not for a `jobs` role (`role`):
    the other roles' programs share that config."""
    config_existed, out_existed = (out / CONFIG_FILE).exists(), out.exists()
    try:
        yield
    except BaseException:
        fresh = role is None and not config_existed
        if fresh and jax.process_index() == 0 and not _has_records(out):
            with contextlib.suppress(OSError):
                (out / CONFIG_FILE).unlink(missing_ok=True)
                if not out_existed and not any(out.iterdir()):
                    out.rmdir()
        raise


def setup_logging() -> None:
    """INFO logs for jaxdetox, warnings for the rest."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("jaxdetox").setLevel(logging.INFO)


def require_done(run: RunDir, iteration: int, stage: str, why: str) -> None:
    """Raise `ConfigError` unless (iteration, stage) is done in the manifest."""
    if iteration > 0 and not run.is_done(iteration, stage):
        raise ConfigError(
            f"{run.manifest_path}: {why} needs {stage} of iteration {iteration}, which is not "
            "done; run it first (or `jaxdetox run` the whole config)"
        )


def execute(config: RunConfig, out: Path, *, progress: bool = True, role: str | None = None) -> int:
    """Run (or resume) the experiment in `out` (with `loop.placement=jobs`: its `role`; a λ
    sweep: one run per λ under `out`). A start that fails before its first stage leaves no
    `config.yaml` behind (`undo_failed_start`)."""
    from jaxdetox.methods import method_of, write_sweep_index

    setup_logging()
    start = time.perf_counter()
    method = method_of(config.method)
    with undo_failed_start(out, role=role):
        if method.sweep is not None:
            runs = method.sweep(config, out)
            open_run(config, out, role=role).close()
            write_sweep_index(out, config.method, runs)
            complete = all([_execute_one(sub, path, progress, role) for sub, path in runs])
        else:
            complete = _execute_one(config, out, progress, role)
    took = time.perf_counter() - start
    if not complete:
        print(f"role {role} done in {took:.0f} s; the run completes when the other roles finish")
        return 0
    print(f"run {config.name!r} ({config.method}) complete in {took:.0f} s: {out}")
    return 0


def _execute_one(config: RunConfig, out: Path, progress: bool, role: str | None) -> bool:
    """One run directory: the method's plan through its placement."""
    from jaxdetox.pipeline.placement import run_placed

    with undo_failed_start(out, role=role):
        run_dir = open_run(config, out, role=role)
        complete = run_placed(config, run_dir, role=role, progress=progress)
        run_dir.close()
    metrics = out / ("metrics.<role>.jsonl (one per role)" if role else "metrics.jsonl")
    print(f"  {out}: manifest {out / 'manifest.json'}, metrics {metrics}")
    if (out / "final").exists():
        print(f"  final models in {out / 'final'} (model/: HF checkpoint)")
    return complete
