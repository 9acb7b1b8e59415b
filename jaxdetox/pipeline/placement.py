"""Where the roles of a run execute (`loop.placement`), for either scheme.

    colocated  every stage on the whole mesh, in the flow's order (one thread);
    split      one host, three threads — sampler, NADO trainer, LLM trainer — each on its own
               sub-mesh of the local devices (`loop.roles`); JAX dispatch is asynchronous, so
               the roles' programs run concurrently. A finished LLM_j / NADO_k is handed to
               the roles that consume it by `jax.device_put` onto their sub-mesh;
    jobs       one program per role (`jaxdetox run CONFIG --out RUN --role lm`), each with its
               own processes and devices (multi-host within itself); the roles coordinate
               only through the run directory: a role polls the manifest until the records of
               its inputs are done (their outputs were complete before the record said so),
               then restores them from their checkpoints and sample store;
    joint      (parallel scheme) colocated, with each iteration's train_nado and finetune on
               the same samples run as one joint stage (`pipeline.joint`: one program per step).

Every placement runs the same `Stage`s with the same inputs — the plan of the run's method
(`jaxdetox.methods`: the method's schemes and every baseline) — so they end with the same
weights; a stage waits only for the artefacts it consumes, and checks that they were made
from the versions the flow prescribes. The run is complete when every planned stage is.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import jax

from jaxdetox.config import ROLES, RunConfig
from jaxdetox.methods import method_of, run_finished
from jaxdetox.pipeline import flow, joint
from jaxdetox.pipeline.artefacts import Handover
from jaxdetox.pipeline.experiment import Experiment
from jaxdetox.pipeline.rundir import RunDir
from jaxdetox.pipeline.sample import sampled_by

logger = logging.getLogger(__name__)


class Cancelled(RuntimeError):
    """Another role of this program failed; this one stops waiting."""


def check_sample_store(
    exp: Experiment, stage: flow.Stage, made_by: dict[tuple[str, int], flow.Stage]
) -> None:
    """The sample store's S_s (which `stage` consumes) was drawn by the LLM the flow says."""
    s = stage.input_versions.get("samples")
    if s is None or stage.name == "sample":
        return
    expected = made_by["samples", s].input_versions["lm"]
    drawn_by = sampled_by(exp, s)
    if drawn_by is not None and drawn_by != expected:
        raise flow.VersionError(
            f"{stage} (role {stage.role}) consumes S_{s}, which the flow draws from LLM_{expected}, "
            f"but {exp.store.root}'s S_{s} was drawn from LLM_{drawn_by}"
        )


def _records(run: RunDir) -> dict[tuple[int, str], dict[str, Any]]:
    return {(r["iteration"], r["stage"]): r for r in run.manifest()}


def wait_for_inputs(
    exp: Experiment,
    stage: flow.Stage,
    made_by: dict[tuple[str, int], flow.Stage],
    cancelled: threading.Event | None = None,
) -> None:
    """Block until every input of `stage` is done (polling the manifest), checking versions."""
    loop = exp.config.loop
    start = time.monotonic()
    announced = False
    while True:
        pending = flow.check_inputs(stage, made_by, _records(exp.run))
        if not pending:
            return
        if cancelled is not None and cancelled.is_set():
            raise Cancelled(f"{stage}: stopped, another role failed")
        waited = time.monotonic() - start
        names = ", ".join(f"{p} (role {p.role})" for p in pending)
        if waited > loop.wait_timeout:
            raise TimeoutError(
                f"role {stage.role}: waited {waited:.0f} s for {names} to finish before {stage}; "
                f"is that role running (`jaxdetox run CONFIG --out {exp.run.root} --role "
                f"{pending[0].role}`)? loop.wait_timeout sets the limit"
            )
        if not announced:
            logger.info("role %s: %s waits for %s", stage.role, stage, names)
            announced = True
        time.sleep(loop.poll_seconds if loop.placement == "jobs" else 0.05)


def run_stages(exp: Experiment, role: str | None, cancelled: threading.Event | None = None) -> None:
    """The stages of `role` (None: all) of the run's method, in plan order, each once its
    inputs are done."""
    method = method_of(exp.config.method)
    stages = method.plan(exp.config)
    made_by = flow.producers(stages)
    fused = exp.config.loop.placement == "joint"
    for unit in joint.fused_units(stages) if fused else [(s,) for s in stages]:
        if role is None or unit[0].role == role:
            for stage in unit:
                wait_for_inputs(exp, stage, made_by, cancelled)
                check_sample_store(exp, stage, made_by)
            if len(unit) == 1:
                method.run(exp, unit[0])
            else:
                joint.run_joint(exp, *unit)


def run_colocated(exp: Experiment) -> None:
    """Every stage on the experiment's whole mesh, one after another."""
    run_stages(exp, None)


def role_devices(config: RunConfig, devices: list[Any] | None = None) -> dict[str, list[Any]]:
    """`loop.roles` resolved to each role's local devices (counts are counted off in order)."""
    devices = list(jax.local_devices() if devices is None else devices)
    roles, out, next_free = config.loop.roles, {}, 0
    for role in ROLES:
        spec = roles[role]
        if isinstance(spec, int):
            indices, next_free = list(range(next_free, next_free + spec)), next_free + spec
        else:
            indices = list(spec)
        bad = [i for i in indices if not 0 <= i < len(devices)]
        if bad:
            raise ValueError(
                f"loop.roles.{role}: device indices {bad} do not exist; this host has "
                f"{len(devices)} devices ({roles})"
            )
        out[role] = [devices[i] for i in indices]
    return out


def run_split(config: RunConfig, run: RunDir, *, progress: bool = True) -> None:
    """The roles as threads on disjoint sub-meshes of this host's devices."""
    if jax.process_count() > 1:
        raise ValueError(
            "loop.placement 'split' is for one host (multi-controller JAX cannot give "
            "processes disjoint sub-meshes); use placement 'jobs' with one program per role"
        )
    handover = Handover()
    placed = role_devices(config)
    # Loaded one after another (each loads the base weights onto its own sub-mesh).
    exps = {
        role: Experiment(config, run, progress=progress, devices=placed[role], handover=handover)
        for role in ROLES
    }
    cancelled = threading.Event()
    with ThreadPoolExecutor(len(ROLES), thread_name_prefix="role") as pool:
        futures = {pool.submit(run_stages, exps[r], r, cancelled): r for r in ROLES}
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() for f in done):
            cancelled.set()
    errors = [f.exception() for f in futures if f.exception() is not None]
    real = [e for e in errors if not isinstance(e, Cancelled)]
    if real or errors:
        raise (real or errors)[0]


def run_role(config: RunConfig, run: RunDir, role: str, *, progress: bool = True) -> bool:
    """One role of the `jobs` placement; returns whether the whole run is now complete
    (then this role, the last to finish, has written the merged `manifest.json`)."""
    exp = Experiment(config, run, progress=progress)
    run_stages(exp, role)
    complete = run_finished(config, run.root)
    if complete:
        run.write_merged_manifest()
    return complete


def run_placed(config: RunConfig, run: RunDir, *, role: str | None, progress: bool) -> bool:
    """Run `config` with its placement (`role`: this program's role under `jobs`)."""
    placement = config.loop.placement
    if placement == "jobs":
        if role is None:
            raise ValueError(
                "loop.placement 'jobs': start each role as its own program with "
                "`jaxdetox run CONFIG --out RUN_DIR --role sampler|nado|lm`"
            )
        return run_role(config, run, role, progress=progress)
    if role is not None:
        raise ValueError(f"--role {role} needs loop.placement 'jobs' (it is {placement!r})")
    if placement == "split":
        run_split(config, run, progress=progress)
    else:
        run_colocated(Experiment(config, run, progress=progress))
    return True
