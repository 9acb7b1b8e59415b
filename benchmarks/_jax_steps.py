"""Our side of the train-step benchmarks: jitted steps threading one `TrainState` (no PyTorch)."""

from __future__ import annotations

import functools
from typing import Any

import jax

from jaxdetox.train import StepConfig, StepRunner, place_batch


def block(tree: Any) -> Any:
    """Wait for every array of `tree`."""
    return jax.block_until_ready(tree)


def cost_flops(compiled: Any) -> float | None:
    """XLA's cost-analysis FLOPs of a compiled program (a `while` body counts once)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return None if not analysis else float(analysis.get("flops", 0.0))


class Ours:
    """Threads one `TrainState` through several runners (each donates and returns it)."""

    def __init__(self, tr: Any, mesh: Any) -> None:
        self.tr, self.mesh, self.state = tr, mesh, tr.state
        self.runners: dict[str, StepRunner] = {}

    def runner(self, name: str, step: Any, config: StepConfig | None = None) -> StepRunner:
        """The runner `name` of `step` (made once)."""
        if name not in self.runners:
            config = config or StepConfig()
            fn = functools.partial(step, models=self.tr.models, config=config)
            self.runners[name] = StepRunner(fn, self.mesh, self.tr.shardings, name=name)
        return self.runners[name]

    def step(self, name: str, batch: dict) -> Any:
        """One step of runner `name`; returns its metrics once computed."""
        self.state, metrics = self.runners[name](self.state, batch)
        return block(metrics)

    def compiled(self, name: str, batch: dict) -> Any:
        """The compiled executable of runner `name` on `batch`."""
        return self.runners[name].compile(self.state, place_batch(batch, self.mesh))

    def compile(self, name: str, batch: dict) -> tuple[float, float | None]:
        """(compile seconds, XLA cost-analysis FLOPs) of runner `name` on `batch`."""
        r = self.runners[name]
        before = r.compile_seconds
        flops = cost_flops(self.compiled(name, batch))
        return r.compile_seconds - before, flops
