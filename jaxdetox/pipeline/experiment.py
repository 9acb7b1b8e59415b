"""What every stage of a run shares, as parts with one job each:

- `context` (`pipeline/context.py`): the mesh, tokenizer, model definitions and compiled
  programs, fixed for the run;
- `artefacts` (`pipeline/artefacts.py`): the versioned LLM_j / NADO_k, held, handed over
  between roles, saved and restored with their version checks;
- `samplers` (`pipeline/samplers.py`): the LLM's and the guided sampler;
- `prompts` (`pipeline/prompts.py`): prompt blocks, tokenisation, chat template, sampling
  settings;
- `constraints` (`pipeline/constraints.py`): the oracles, their caches and labels;
- `store`: the sample store S_i.

With the `split` placement each role has its own `Experiment` on its own sub-mesh, sharing
one `Handover` with the other roles.
"""

from __future__ import annotations

from typing import Any

from jaxdetox.config import RunConfig
from jaxdetox.data import SampleStore
from jaxdetox.pipeline.artefacts import ArtefactTable, Handover
from jaxdetox.pipeline.constraints import Constraints
from jaxdetox.pipeline.context import load_context
from jaxdetox.pipeline.prompts import Prompts
from jaxdetox.pipeline.rundir import RunDir
from jaxdetox.pipeline.samplers import Samplers


class Experiment:
    """The parts of one run (built once per process), and its config and run directory."""

    def __init__(
        self,
        config: RunConfig,
        run: RunDir,
        *,
        progress: bool = True,
        devices: list[Any] | None = None,
        handover: Handover | None = None,
    ) -> None:
        """Load the base LLM onto the mesh (over `devices`, default all) and open the sample
        store; `handover`: the table shared with other roles' experiments of this program."""
        self.config = config
        self.run = run
        self.progress = progress
        self.constraints = Constraints(config, run.root)
        self.context, initial = load_context(config, devices)
        names = [c.name for c in self.constraints]
        self.artefacts = ArtefactTable(self.context, run, initial, names, handover)
        self.samplers = Samplers(self.context, self.artefacts)
        self.prompts = Prompts(
            config.prompts, config.sampling, self.context.tokenizer, self.context.lm_config
        )
        self.store = SampleStore(run.samples)
