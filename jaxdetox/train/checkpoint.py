"""Orbax checkpoints of a training stage: the train state, the data iterator and metadata.

One `CheckpointManager` per stage directory; each step is saved atomically (orbax writes a
temporary directory and renames it when complete, so a run killed mid-save leaves only the
previous complete step), asynchronously (training continues while the arrays are written),
keeping the newest `keep`. Restore targets an *abstract* state whose leaves carry the
shardings wanted now, so a checkpoint saved on one mesh restores onto another. Before
restoring, the stored tree is compared with the target and any difference (missing or
extra leaves, shapes, dtypes) is reported by path.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxdetox.errors import JaxdetoxError
from jaxdetox.train.state import key_path


class CheckpointError(JaxdetoxError, RuntimeError):
    """A checkpoint is missing or does not match what the run expects."""


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(key_path(p)): (tuple(x.shape), str(np.dtype(x.dtype))) for p, x in flat}


def describe_mismatch(stored: Any, target: Any) -> list[str]:
    """Human-readable differences between a stored tree's metadata and a target tree."""
    a, b = _leaf_specs(stored), _leaf_specs(target)
    lines = [f"missing in checkpoint: {k} {b[k][0]} {b[k][1]}" for k in sorted(b.keys() - a)]
    lines += [f"not expected: {k} {a[k][0]} {a[k][1]}" for k in sorted(a.keys() - b)]
    for k in sorted(a.keys() & b.keys()):
        if a[k] != b[k]:
            lines.append(f"{k}: checkpoint has {a[k][0]} {a[k][1]}, expected {b[k][0]} {b[k][1]}")
    return lines


class Checkpointer:
    """Save / restore `(state, data_state, meta)` per step in `directory` (orbax)."""

    def __init__(
        self, directory: str | os.PathLike[str], *, keep: int = 2, async_save: bool = True
    ) -> None:
        """Open (or create) the checkpoint directory (a relative local path is made absolute,
        as orbax requires)."""
        local = "://" not in os.fspath(directory)
        self.directory = epath.Path(os.path.abspath(directory) if local else directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """The newest complete step, or None when nothing was saved."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete step kept."""
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Start saving `step` (async); every process must call it with the same step."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state or {}),
                meta=ocp.args.JsonSave(meta or {}),
            ),
            force=True,
        )

    def restore(
        self, abstract_state: Any, step: int | None = None
    ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """`(state, data_state, meta)` of `step` (default: latest) onto `abstract_state`'s
        shardings; raises `CheckpointError` naming what differs."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise CheckpointError(
                f"{self.directory}: no checkpoint for step {step} (have {self.all_steps()})"
            )
        stored = self._manager.item_metadata(step)["state"]
        stored_tree = getattr(stored, "tree", stored)
        diff = describe_mismatch(stored_tree, abstract_state)
        if diff:
            shown = "\n  ".join(diff[:20])
            more = f"\n  ... {len(diff) - 20} more" if len(diff) > 20 else ""
            raise CheckpointError(
                f"{self.directory} step {step} does not match this run:\n  {shown}{more}"
            )
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], dict(out["data"] or {}), dict(out["meta"] or {})

    def wait(self) -> None:
        """Block until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
