"""The run's versioned artefacts: LLM_j, NADO_k and each further constraint's NADO_k.

Every artefact is the output of a stage: `lm` version j is what finetune of iteration j
writes (the LLM's parameters, or with LoRA its adapters: LLM_j = base ⊕ adapters_j),
`nado` version k what train_nado of iteration k writes (a further constraint's NADO beside
it, in `artifact_<name>`); version 0 is the base LLM / initial adapters / initial NADO,
never written. One table holds them in memory under one keep policy (`stale`); a version
not held is taken from another role's `Handover` (the `split` placement: each role has its
own table on its own sub-mesh, and `jax.device_put` reshards between them) or restored from
its stage's `artifact` folder, refusing one made from other versions than the manifest
records (`VersionError`). So a restarted run never recomputes a finished stage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
from etils.epath import Path

from jaxdetox.pipeline.context import Initial, RunContext
from jaxdetox.pipeline.rundir import RunDir
from jaxdetox.train.checkpoint import Checkpointer, CheckpointError
from jaxdetox.train.state import Params

ARTIFACT = "artifact"
LM, NADO = "lm", "nado"
STAGE_OF = {LM: "finetune", NADO: "train_nado"}  # the stage whose output each kind is

# (kind, constraint): which artefact; constraint is None for the LLM and the first NADO.
Slot = tuple[str, str | None]


def stale(kind: str, version: int, made: int) -> bool:
    """The keep policy: whether `version` of `kind` may leave memory once version `made` is
    held (one asked for again is restored). Once LLM_i exists no stage reads LLM_{i−1}
    (the base stays; the parallel scheme's train_nado i+1 restores the LLM_{i−1} that drew
    its samples), while the parallel scheme's finetune i still reads NADO_{i−1} after NADO_i
    is made: so the base and the newest LLM, the two newest NADOs."""
    if kind == LM:
        return 0 < version < made
    return version < made - 1


def location(slot: Slot) -> tuple[str, str]:
    """`(stage, folder)` holding an artefact's versions: `iter_NNN/<stage>/<folder>`."""
    kind, constraint = slot
    return STAGE_OF[kind], ARTIFACT if constraint is None else f"{ARTIFACT}_{constraint}"


def slot_of(stage: str, folder: str = ARTIFACT) -> Slot:
    """The artefact a stage's `folder` holds (the inverse of `location`)."""
    kind = next(k for k, s in STAGE_OF.items() if s == stage)
    return kind, None if folder == ARTIFACT else folder.removeprefix(f"{ARTIFACT}_")


class Handover:
    """Finished artefacts of the role threads of one program, by (slot, version)."""

    def __init__(self) -> None:
        """An empty hand-over table."""
        self._items: dict[tuple[Slot, int], Params] = {}
        self._lock = threading.Lock()

    def put(self, slot: Slot, version: int, params: Params) -> None:
        """Publish `slot`'s `version`; drops versions two or more older (a role may still be
        about to read the previous one)."""
        with self._lock:
            self._items[slot, version] = params
            for old in [k for k in self._items if k[0] == slot and k[1] < version - 1]:
                del self._items[old]

    def get(self, slot: Slot, version: int) -> Params | None:
        """The published params, or None."""
        with self._lock:
            return self._items.get((slot, version))


class ArtefactTable:
    """One experiment's artefact versions: held, published, saved and restored."""

    def __init__(
        self,
        context: RunContext,
        run: RunDir,
        initial: Initial,
        constraints: Sequence[str],
        handover: Handover | None = None,
    ) -> None:
        """Hold version 0 of every artefact; `constraints`: the constraint names, the first
        one's NADO being `nado` itself; `handover`: shared with the other roles' tables."""
        self.context, self.run, self.handover = context, run, handover
        self.base = initial.base  # the base LLM's parameters, held for the whole run
        self.handover_seconds = 0.0  # spent bringing in other stages' versions
        self._first = constraints[0] if constraints else None
        self._held: dict[tuple[str, str | None, int], Params] = {(LM, None, 0): initial.lm}
        for name in (None, *constraints[1:]):  # every NADO starts from the initial one
            self._held[NADO, name, 0] = initial.nado

    def _slot(self, kind: str, constraint: str | None) -> Slot:
        if kind not in STAGE_OF:
            raise ValueError(f"artefact kind {kind!r}: expected one of {sorted(STAGE_OF)}")
        if kind == LM and constraint is not None:
            raise ValueError(f"the LLM has no constraint; got constraint={constraint!r}")
        return kind, None if constraint == self._first else constraint

    # ------------------------------------------------------------------ reading

    def get(self, kind: str, version: int, constraint: str | None = None) -> Params:
        """Stage output `kind` (lm | nado) `version` of `constraint` (None: the first): from
        memory, another role, or its stage's artefact folder."""
        slot = self._slot(kind, constraint)
        if (*slot, version) not in self._held:
            self._hold(slot, version, self._fetch(slot, version))
        return self._held[(*slot, version)]

    def lm_params(self, version: int) -> Params:
        """LLM_version's parameters (0 = base; LoRA: the base with adapters_version merged
        in, anew each time: no full copy is held)."""
        if self.context.lora is None:
            return self.get(LM, version)
        if version == 0:
            return self.base
        return self.context.lora.merge(self.base, self.get(LM, version))

    def adapters(self, version: int) -> Params:
        """LoRA adapters of LLM_version (0 = the initial ones, B = 0)."""
        if self.context.lora is None:
            raise ValueError("adapters: the run has no finetune.lora section")
        return self.get(LM, version)

    def lora_module(self, version: int) -> Any:
        """The LoRA LLM module: base weights (no copy) plus adapters_version."""
        return self.context.lora_module(self.base, self.adapters(version))

    def nado_params(self, version: int, constraint: str | None = None) -> Params:
        """NADO_version (0 = initial) of the first constraint or of `constraint`."""
        return self.get(NADO, version, constraint)

    def held_versions(self, kind: str, constraint: str | None = None) -> list[int]:
        """The versions of `kind` (of `constraint`) held in memory, oldest first."""
        slot = self._slot(kind, constraint)
        return sorted(k[2] for k in self._held if k[:2] == slot)

    def held_nado(self) -> Params:
        """Some version of the first NADO held in memory (a module's structure needs one)."""
        return next(p for (k, c, _), p in self._held.items() if k == NADO and c is None)

    # ------------------------------------------------------------------ holding

    def keep(self, kind: str, version: int, params: Params, constraint: str | None = None) -> None:
        """Hold a finished artefact in memory and publish it to the other roles."""
        slot = self._slot(kind, constraint)
        self._hold(slot, version, params)
        if self.handover is not None:
            self.handover.put(slot, version, params)

    def _hold(self, slot: Slot, version: int, params: Params) -> None:
        self._held[(*slot, version)] = params
        drop = [k for k in self._held if k[:2] == slot and stale(slot[0], k[2], version)]
        for old in drop:
            del self._held[old]

    def _fetch(self, slot: Slot, version: int) -> Params:
        start = time.perf_counter()
        shared = self.handover.get(slot, version) if self.handover else None
        if shared is not None:  # made by another role on its sub-mesh: reshard onto ours
            shardings = self.context.output_shardings(slot[0])
            params = jax.block_until_ready(jax.device_put(shared, shardings))
        else:
            params = self.restore(slot[0], version, slot[1])
        self.handover_seconds += time.perf_counter() - start
        return params

    # ------------------------------------------------------------------ disk

    def directory(self, kind: str, version: int, constraint: str | None = None) -> Path:
        """The folder holding stage output `kind` `version` (of `constraint`)."""
        stage, folder = location(self._slot(kind, constraint))
        return self.run.stage_dir(version, stage) / folder

    def save(
        self,
        kind: str,
        version: int,
        params: Params,
        inputs: dict[str, int],
        constraint: str | None = None,
    ) -> str:
        """Write a stage's output parameters (orbax, atomic) with the versions they were made
        from (`inputs`); returns the directory."""
        directory = self.directory(kind, version, constraint)
        stage = STAGE_OF[kind]
        with Checkpointer(directory, keep=1, async_save=False) as ckpt:
            ckpt.save(0, params, meta={"iteration": version, "stage": stage, "inputs": inputs})
        return str(directory)

    def restore(self, kind: str, version: int, constraint: str | None = None) -> Params:
        """Read stage output `kind` `version` from disk, refusing (`VersionError`) one made
        from other versions than the manifest's record of its stage consumed."""
        directory = self.directory(kind, version, constraint)
        stage = STAGE_OF[kind]
        if not directory.exists():
            raise CheckpointError(
                f"{directory}: missing; the manifest says {stage} of iteration {version} is "
                "done but its output is gone (delete that manifest record to redo the stage)"
            )
        with Checkpointer(directory, keep=1, async_save=False) as ckpt:
            params, _, meta = ckpt.restore(self.context.restore_target(kind), step=0)
        record = self.run.record(version, stage)
        made_from = meta.get("inputs")
        if record is not None and made_from is not None and made_from != record["inputs"]:
            from jaxdetox.pipeline.flow import VersionError, describe

            raise VersionError(
                f"{directory}: made from {describe(made_from)}, but the manifest's {stage} of "
                f"iteration {version} consumed {describe(record['inputs'])}"
            )
        return params
