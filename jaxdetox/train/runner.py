"""Jit a pure step with explicit shardings and run it on host batches.

`StepRunner(step_fn, mesh, state_shardings)` compiles `step_fn(state, batch)` once per batch
signature (shapes, dtypes) with `in_shardings` / `out_shardings` from the one rules table,
the state donated, and counts compilations (`compile_count`): a run whose batches keep their
shapes compiles each step exactly once. Host batches (numpy, this process's rows) are
assembled into global arrays sharded over the batch axes (`data`, `fsdp`); host bookkeeping
(ids, texts) never goes to the devices.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxdetox import sharding
from jaxdetox.data.corpora import to_global
from jaxdetox.train.state import replicated
from jaxdetox.train.steps import STEP_KEYS

logger = logging.getLogger(__name__)


def step_inputs(batch: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """The arrays of each stream a step reads (see `steps.STEP_KEYS`), nothing else."""
    return {
        name: {k: np.asarray(v) for k, v in stream.items() if k in STEP_KEYS}
        for name, stream in batch.items()
    }


def place_batch(batch: dict[str, dict[str, np.ndarray]], mesh: Mesh) -> Any:
    """Host batch (this process's rows) -> global arrays, batch axis over `data` x `fsdp`."""
    inputs = step_inputs(batch)
    hosts = jax.process_count()

    def shardings(stream: dict[str, np.ndarray]) -> dict[str, Any]:
        return {
            k: sharding.batch_sharding(mesh, (v.shape[0] * hosts, *v.shape[1:]))
            for k, v in stream.items()
        }

    return {name: to_global(stream, shardings(stream)) for name, stream in inputs.items()}


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


class StepRunner:
    """A jitted train step with fixed state shardings; compiles once per batch signature."""

    def __init__(
        self,
        step_fn: Callable[[Any, Any], tuple[Any, Any]],
        mesh: Mesh,
        state_shardings: Any,
        *,
        name: str = "step",
        donate: bool = True,
        returns_state: bool = True,
    ) -> None:
        """Hold the step; nothing compiles before the first call.

        `returns_state=False`: `step_fn(state, batch) -> metrics` (evaluation), state kept.
        """
        self.step_fn = step_fn
        self.mesh = mesh
        self.state_shardings = state_shardings
        self.name = name
        self.donate = donate and returns_state
        self.returns_state = returns_state
        self._compiled: dict[tuple, Any] = {}
        self.compile_count = 0
        self.compile_seconds = 0.0

    def compile(self, state: Any, batch: Any) -> Any:
        """The executable for this (placed) batch's signature, compiling it if new."""
        key = _signature(batch)
        if key not in self._compiled:
            start = time.perf_counter()
            batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
            jitted = jax.jit(
                self.step_fn,
                in_shardings=(self.state_shardings, batch_shardings),
                out_shardings=(self.state_shardings, replicated(self.mesh))
                if self.returns_state
                else replicated(self.mesh),
                donate_argnums=(0,) if self.donate else (),
            )
            with jax.set_mesh(self.mesh):
                self._compiled[key] = jitted.lower(state, batch).compile()
            self.compile_count += 1
            self.compile_seconds += time.perf_counter() - start
            logger.info("compiled %s in %.1f s", self.name, time.perf_counter() - start)
        return self._compiled[key]

    def __call__(self, state: Any, host_batch: Any) -> Any:
        """Run one step on a host batch: `(new state, device metrics)`, or only the metrics
        when built with `returns_state=False`."""
        batch = place_batch(host_batch, self.mesh)
        with jax.set_mesh(self.mesh):
            return self.compile(state, batch)(state, batch)
