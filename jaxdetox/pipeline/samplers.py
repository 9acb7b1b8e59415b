"""The run's two samplers, each built once and reused for every version: the LLM's, and
the NADO-guided one (LLM ⊕ NADO). Their compiled programs take the parameters with each
call, so one sampler serves LLM_0, LLM_1, ... alike."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from flax import nnx

from jaxdetox.pipeline.artefacts import ArtefactTable
from jaxdetox.pipeline.context import RunContext


class Samplers:
    """The LLM sampler and the guided sampler of one experiment, and their parameters."""

    def __init__(self, context: RunContext, artefacts: ArtefactTable) -> None:
        """Samplers on `context`'s mesh for the versions `artefacts` holds."""
        self.context, self.artefacts = context, artefacts

    @cached_property
    def plain(self) -> Any:
        """One sampler for every LLM version (its compiled programs are reused)."""
        from jaxdetox.lm import lm_sampler

        return lm_sampler(self.context.language_model(self.artefacts.lm_params(0)))[0]

    @cached_property
    def guided(self) -> Any:
        """One NADO-guided sampler (LLM ⊕ NADO) for every version of both."""
        from jaxdetox.lm import lm_sampler

        lm = self.context.language_model(self.artefacts.lm_params(0))
        # The module gives the structure only (parameters come with each call), so any held
        # version serves: NADO_0 is never saved and is dropped once NADO_2 exists.
        return lm_sampler(lm, self.context.nado_module(self.artefacts.held_nado()))[0]

    def lm_state(self, version: int) -> nnx.State:
        """LLM_version's parameters in the form the samplers take."""
        return self.context.lm_state(self.artefacts.lm_params(version))

    def nado_state(self, version: int) -> nnx.State:
        """NADO_version's parameters in the form the guided sampler takes."""
        return self.context.nado_state(self.artefacts.nado_params(version))
