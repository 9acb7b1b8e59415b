"""What a run fixes once and never changes: the device mesh, the tokenizer, the model
definitions (graphs, abstract states, shardings) of the LLM, the NADO and the LoRA model,
and the compiled programs reused across iterations.

`load_context(config)` loads the base LLM onto the mesh and builds the initial NADO (and
LoRA adapters); it returns the frozen `RunContext` and those version-0 parameters
(`Initial`), which the artefact table (`pipeline/artefacts.py`) then holds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
from flax import nnx

from jaxdetox import sharding
from jaxdetox.config import RunConfig
from jaxdetox.models import NadoConfig, init_nado, load_pretrained
from jaxdetox.models.config import ModelConfig
from jaxdetox.models.registry import abstract_model
from jaxdetox.train.state import (
    Params,
    abstract_like,
    param_shardings,
    split_params,
    to_nnx_state,
)

logger = logging.getLogger(__name__)


def mesh_for(config: RunConfig, devices: list[Any] | None = None) -> jax.sharding.Mesh:
    """The run's device mesh (on `devices`, default all)."""
    m = config.mesh
    return sharding.make_mesh((m.data, m.fsdp, m.tensor), devices)


class Memo(dict):
    """Values made once per key and reused: compiled step runners, loaded models."""

    def get_or_make(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value under `key`, made by `make()` the first time it is asked for."""
        if key not in self:
            self[key] = make()
        return self[key]


@dataclasses.dataclass(frozen=True)
class LoraParts:
    """The LoRA model's fixed parts: its config, graph, abstract state, the adapters'
    shardings and restore target, and the compiled merge `(base, adapters) -> LLM params`."""

    config: Any  # models.lora.LoraConfig
    graph: nnx.GraphDef
    abstract: nnx.State
    adapter_shardings: Params
    adapter_target: Params  # ShapeDtypeStructs of the adapters, with their shardings
    merge: Callable[[Params, Params], Params]


@dataclasses.dataclass(frozen=True)
class RunContext:
    """The run's fixed parts: mesh, tokenizer, the LLM's and the NADO's definitions
    (config, graph, abstract state with metadata, parameter shardings), LoRA's when
    configured, and the caches of compiled programs (`programs`) and of further models
    loaded by path (`models`, e.g. eval's fluency model)."""

    mesh: jax.sharding.Mesh
    tokenizer: Any
    lm_config: ModelConfig
    lm_graph: nnx.GraphDef
    lm_abstract: nnx.State
    lm_shardings: Params
    nado_config: NadoConfig
    nado_graph: nnx.GraphDef
    nado_abstract: nnx.State
    nado_shardings: Params
    lora: LoraParts | None = None
    programs: Memo = dataclasses.field(default_factory=Memo, repr=False, compare=False)
    models: Memo = dataclasses.field(default_factory=Memo, repr=False, compare=False)

    def lm_module(self, params: Params) -> nnx.Module:
        """The LLM module for params (no copy), with its variables' metadata."""
        return nnx.merge(self.lm_graph, self.lm_state(params))

    def nado_module(self, params: Params) -> nnx.Module:
        """The NADO module for params (no copy), with its variables' metadata."""
        return nnx.merge(self.nado_graph, self.nado_state(params))

    def lm_state(self, params: Params) -> nnx.State:
        """LLM params as an nnx State with their metadata (the form the sampler takes)."""
        return to_nnx_state(self.lm_abstract, params)

    def nado_state(self, params: Params) -> nnx.State:
        """NADO params as an nnx State with their metadata (the guided sampler's form)."""
        return to_nnx_state(self.nado_abstract, params)

    def lora_module(self, base: Params, adapters: Params) -> nnx.Module:
        """The LoRA LLM module: `base` weights (no copy) plus `adapters`."""
        from jaxdetox.models import lora

        if self.lora is None:
            raise ValueError("lora_module: the run has no finetune.lora section")
        params = lora.combine(base, adapters)
        return nnx.merge(self.lora.graph, to_nnx_state(self.lora.abstract, params))

    def language_model(self, params: Params) -> Any:
        """A `LanguageModel` view of LLM params (for export and evaluation)."""
        from jaxdetox.lm import LanguageModel

        return LanguageModel(self.lm_config, self.lm_module(params), self.tokenizer, self.mesh)

    def restore_target(self, kind: str) -> Params:
        """ShapeDtypeStructs (with shardings) of a stage output of `kind`: `lm` (LoRA: the
        adapters) or `nado`."""
        if kind == "lm" and self.lora is not None:
            return self.lora.adapter_target
        abstract, shardings = (
            (self.lm_abstract, self.lm_shardings)
            if kind == "lm"
            else (self.nado_abstract, self.nado_shardings)
        )
        return abstract_like(nnx.to_pure_dict(abstract), shardings)

    def output_shardings(self, kind: str) -> Params:
        """Shardings of a stage output of `kind` on this mesh (LoRA's `lm`: the adapters')."""
        if kind == "lm":
            return self.lm_shardings if self.lora is None else self.lora.adapter_shardings
        return self.nado_shardings


class Initial(NamedTuple):
    """Version 0 of the run's artefacts: the base LLM, the LLM kind's version 0 (the base,
    or with LoRA the initial adapters, B = 0) and the initial NADO."""

    base: Params
    lm: Params
    nado: Params


def load_context(config: RunConfig, devices: list[Any] | None = None) -> tuple[RunContext, Initial]:
    """Load the base LLM onto the run's mesh (over `devices`, default all) and build the
    initial NADO (and LoRA adapters): the run's context and the version-0 parameters."""
    mesh = mesh_for(config, devices)
    logger.info("loading %s onto mesh %s", config.model.path, dict(mesh.shape))
    base = load_pretrained(
        config.model.path, mesh=mesh, dtype=config.model.dtype, param_dtype=config.model.param_dtype
    )
    if base.tokenizer is None:
        raise ValueError(f"model.path {config.model.path!r}: no tokenizer files found")
    lm_config = dataclasses.replace(
        base.config, remat=config.model.remat_policy, attention=config.model.attention
    )
    # The graph of the configured model (remat as configured); the loaded weights fit it.
    lm_graph = nnx.split(abstract_model(lm_config), nnx.Param)[0]
    _, lm_abstract, base_params = split_params(base.model)
    lm_shardings = param_shardings(lm_abstract, mesh)
    nado_config = NadoConfig.from_section(lm_config, config.nado)
    initial_nado = init_nado(
        nado_config,
        config.seed,
        lm_model=base.model if config.nado.init == "lm" else None,
        output_embedding=base.model.unembed_weights()[0],
        mesh=mesh,
    )
    nado_graph, nado_abstract, nado_params = split_params(initial_nado)
    context = RunContext(
        mesh=mesh,
        tokenizer=base.tokenizer,
        lm_config=lm_config,
        lm_graph=lm_graph,
        lm_abstract=lm_abstract,
        lm_shardings=lm_shardings,
        nado_config=nado_config,
        nado_graph=nado_graph,
        nado_abstract=nado_abstract,
        nado_shardings=param_shardings(nado_abstract, mesh),
    )
    if config.finetune.lora is None:
        return context, Initial(base_params, base_params, nado_params)
    lora, adapters = _lora_parts(config.finetune.lora, context, base_params)
    return dataclasses.replace(context, lora=lora), Initial(base_params, adapters, nado_params)


def _lora_parts(section: Any, context: RunContext, base: Params) -> tuple[LoraParts, Params]:
    """LoRA's fixed parts for `finetune.lora` and the initial adapters (B = 0)."""
    from jaxdetox.models import lora

    config = lora.LoraConfig(section.rank, section.alpha, tuple(section.targets))
    model = lora.add_adapters(context.lm_module(base), config, seed=section.seed)
    graph, abstract, params = split_params(model)
    adapters = lora.split_adapters(params)[1]
    adapter_shardings = lora.split_adapters(param_shardings(abstract, context.mesh))[1]
    scale = config.scale  # base and adapters are arguments (a closure would embed them)
    merge = jax.jit(
        lambda base, a: lora.merge_params(base, a, scale), out_shardings=context.lm_shardings
    )
    parts = LoraParts(
        config,
        graph,
        abstract,
        adapter_shardings,
        abstract_like(adapters, adapter_shardings),
        merge,
    )
    return parts, adapters
