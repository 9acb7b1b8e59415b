"""What every stage of a run shares, as parts with one job each:

- `context` (`loop/context.py`): the mesh, tokenizer, model definitions and compiled
  programs, fixed for the run;
- `artefacts` (`loop/artefacts.py`): the versioned LLM_j / NADO_k, held, handed over
  between roles, saved and restored with their version checks;
- `samplers` (`loop/samplers.py`): the LLM's and the guided sampler;
- `prompts` (`loop/prompts.py`): prompt blocks, tokenisation, chat template, sampling
  settings;
- `constraints` (`loop/constraints.py`): the oracles, their caches and labels;
- `store`: the sample store S_i.

With the `split` placement each role has its own `Experiment` on its own sub-mesh, sharing
one `Handover` with the other roles.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from jaxdetox.config import RunConfig
from jaxdetox.data import SampleStore
from jaxdetox.data.prompts import ChatTemplate, PromptSet, TokenizedPrompts
from jaxdetox.pipeline.artefacts import ARTIFACT, ArtefactTable, Handover, slot_of
from jaxdetox.pipeline.constraints import Constraint, Constraints
from jaxdetox.pipeline.context import load_context
from jaxdetox.pipeline.prompts import Prompts, builtin_prompt_set
from jaxdetox.pipeline.rundir import RunDir
from jaxdetox.pipeline.samplers import Samplers
from jaxdetox.sampling import SamplingConfig
from jaxdetox.train.state import Params

# `Handover` and `builtin_prompt_set` are imported from here by stage code (their homes:
# loop/artefacts.py, loop/prompts.py).
__all__ = ["Experiment", "Handover", "builtin_prompt_set"]


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

    # ------------------------------------------------------------------
    # compatibility for stage code: migrate to exp.<part>.<name>

    @property
    def mesh(self) -> Any:
        """`context.mesh`."""
        return self.context.mesh

    @property
    def tokenizer(self) -> Any:
        """`context.tokenizer`."""
        return self.context.tokenizer

    @property
    def lm_config(self) -> Any:
        """`context.lm_config`."""
        return self.context.lm_config

    @property
    def lm_graph(self) -> Any:
        """`context.lm_graph`."""
        return self.context.lm_graph

    @property
    def lm_shardings(self) -> Params:
        """`context.lm_shardings`."""
        return self.context.lm_shardings

    @property
    def nado_config(self) -> Any:
        """`context.nado_config`."""
        return self.context.nado_config

    @property
    def nado_graph(self) -> Any:
        """`context.nado_graph`."""
        return self.context.nado_graph

    @property
    def nado_shardings(self) -> Params:
        """`context.nado_shardings`."""
        return self.context.nado_shardings

    @property
    def lora(self) -> Any:
        """`context.lora.config` (None without `finetune.lora`)."""
        return None if self.context.lora is None else self.context.lora.config

    @property
    def runners(self) -> dict:
        """`context.programs` (compiled step runners, by stage kind and shape)."""
        return self.context.programs

    def lm_module(self, params: Params) -> nnx.Module:
        """`context.lm_module`."""
        return self.context.lm_module(params)

    def nado_module(self, params: Params) -> nnx.Module:
        """`context.nado_module`."""
        return self.context.nado_module(params)

    def language_model(self, params: Params) -> Any:
        """`context.language_model`."""
        return self.context.language_model(params)

    def lm_params(self, iteration: int) -> Params:
        """`artefacts.lm_params`."""
        return self.artefacts.lm_params(iteration)

    def adapters(self, iteration: int) -> Params:
        """`artefacts.adapters`."""
        return self.artefacts.adapters(iteration)

    def lora_module(self, iteration: int) -> nnx.Module:
        """`artefacts.lora_module`."""
        return self.artefacts.lora_module(iteration)

    def nado_params(self, iteration: int, constraint: str | None = None) -> Params:
        """`artefacts.nado_params`."""
        return self.artefacts.nado_params(iteration, constraint)

    def keep(
        self, kind: str, iteration: int, params: Params, constraint: str | None = None
    ) -> None:
        """`artefacts.keep`."""
        self.artefacts.keep(kind, iteration, params, constraint)

    def save_artifact(
        self,
        iteration: int,
        stage: str,
        params: Params,
        inputs: dict[str, int],
        name: str = ARTIFACT,
    ) -> str:
        """`artefacts.save(kind, iteration, params, inputs, constraint)`."""
        kind, constraint = slot_of(stage, name)
        return self.artefacts.save(kind, iteration, params, inputs, constraint)

    @property
    def handover_seconds(self) -> float:
        """`artefacts.handover_seconds`."""
        return self.artefacts.handover_seconds

    @property
    def sampler(self) -> Any:
        """`samplers.plain`."""
        return self.samplers.plain

    def sampler_params(self, version: int) -> Any:
        """`samplers.lm_state`."""
        return self.samplers.lm_state(version)

    @property
    def guided_sampler(self) -> Any:
        """`samplers.guided`."""
        return self.samplers.guided

    def nado_sampler_params(self, version: int) -> Any:
        """`samplers.nado_state`."""
        return self.samplers.nado_state(version)

    @property
    def chat(self) -> ChatTemplate | None:
        """`prompts.chat`."""
        return self.prompts.chat

    def train_prompts(self, block: int) -> TokenizedPrompts:
        """`prompts.train_prompts`."""
        return self.prompts.train_prompts(block)

    def eval_prompt_set(self) -> PromptSet:
        """`prompts.eval_prompt_set`."""
        return self.prompts.eval_prompt_set()

    def eval_prompts(self, chat: bool | None = None) -> TokenizedPrompts:
        """`prompts.eval_prompts`."""
        return self.prompts.eval_prompts(chat)

    def sampling_config(self, samples: int, chat: bool | None = None) -> SamplingConfig:
        """`prompts.sampling_config`."""
        return self.prompts.sampling_config(samples, chat)

    @property
    def prompt_len(self) -> int:
        """`prompts.prompt_len`."""
        return self.prompts.prompt_len

    @property
    def completion_len(self) -> int:
        """`prompts.completion_len`."""
        return self.prompts.completion_len

    @property
    def oracle(self) -> Any:
        """`constraints.oracle()`."""
        return self.constraints.oracle()

    @property
    def label_name(self) -> str:
        """`constraints.label_name`."""
        return self.constraints.label_name

    def constraint_oracle(self, constraint: Constraint) -> Any:
        """`constraints.oracle`."""
        return self.constraints.oracle(constraint)

    def labels(
        self, batch: dict[str, np.ndarray], constraint: Constraint | None = None
    ) -> dict[str, np.ndarray]:
        """`constraints.labels`."""
        return self.constraints.labels(batch, constraint)
