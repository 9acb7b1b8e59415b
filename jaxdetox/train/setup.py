"""Assemble a `TrainState` and its static `Models` from NNX modules placed on a mesh.

The LLM's parameters are taken as they are (already sharded by `load_pretrained(mesh=...)`
or `build_model(mesh=...)`, one tensor at a time); optimizer states are created by a jitted
`init` with `out_shardings`, so every device allocates only its own shard and no host ever
holds a whole state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxdetox.models.lora import split_adapters
from jaxdetox.models.registry import abstract_model
from jaxdetox.train.optimizer import OptimizerConfig, make_optimizer, trainable_mask
from jaxdetox.train.state import (
    Models,
    ModelState,
    Params,
    TrainState,
    cast_params,
    init_model_state,
    model_state_shardings,
    param_shardings,
    replicated,
    split_params,
)


def _copy(params: Params) -> Params:
    # The state is donated to the steps: it must never alias arrays the caller keeps.
    return jax.tree.map(jnp.copy, params)


@dataclasses.dataclass(frozen=True, eq=False)
class Training:
    """A ready-to-step `TrainState`, its static `Models` and the state's shardings."""

    state: TrainState
    models: Models
    shardings: TrainState


def _trainer(
    module: nnx.Module,
    config: OptimizerConfig | None,
    total_steps: int,
    mesh: Mesh,
    base: list | None = None,
) -> tuple[nnx.GraphDef, Params, Params, Any, Any, Any, ModelState | None]:
    graphdef, abstract, params = split_params(module)
    p_shard = param_shardings(abstract, mesh)
    if base is not None:  # LoRA: train the adapters; `base` receives the frozen weights
        (frozen, params), (frozen_shard, p_shard) = split_adapters(params), split_adapters(p_shard)
        base += [frozen, frozen_shard]
    if config is None:
        return graphdef, params, p_shard, None, None, None, None
    module_frozen = tuple(getattr(module, "frozen_params", ()))
    if module_frozen:  # the module's constants never train, whatever the config says
        config = dataclasses.replace(config, frozen=config.frozen + module_frozen)
    optimizer, schedule = make_optimizer(config, total_steps, params)
    mask = trainable_mask(params, config.trainable, config.frozen)
    shard = model_state_shardings(optimizer, params, p_shard, mesh)
    return graphdef, params, p_shard, optimizer, schedule, mask, shard


def make_training(
    lm: nnx.Module,
    nado: nnx.Module | None,
    mesh: Mesh,
    *,
    lm_optimizer: OptimizerConfig | None,
    nado_optimizer: OptimizerConfig | None,
    lm_steps: int = 1,
    nado_steps: int = 1,
    reference: nnx.Module | Params | None = None,
    reference_dtype: str | None = None,
    seed: int = 0,
) -> Training:
    """State for training the LLM (`lm_optimizer`), the NADO (`nado_optimizer`) or both.

    `reference`: the frozen LLM the teacher is built from — a module or params of the LM's
    architecture; default: a copy of `lm`'s current parameters (the base model), optionally
    cast to `reference_dtype` (e.g. "bfloat16" to halve its memory). Every array of the
    returned state is its own copy (steps donate the state).

    An `lm` with LoRA adapters (`models.lora.add_adapters`) trains only its adapters
    (`state.lm.params`); its frozen base weights are `state.ref_params`, the reference, held
    once (`reference` must then be None).
    """
    base: list | None = None
    if getattr(lm, "lora_scale", None) is not None:
        if reference is not None:
            raise ValueError("LoRA: the reference is the base the adapters apply to; pass None")
        base = []
    lm_graph, lm_params, lm_pshard, lm_opt, lm_sched, lm_mask, lm_shard = _trainer(
        lm, lm_optimizer, lm_steps, mesh, base
    )
    nado_graph = nado_opt = nado_sched = nado_mask = nado_shard = None
    nado_state = None
    if nado is not None:
        nado_graph, nado_params, nado_pshard, nado_opt, nado_sched, nado_mask, nado_shard = (
            _trainer(nado, nado_optimizer, nado_steps, mesh)
        )
        if nado_opt is not None:
            nado_state = init_model_state(nado_opt, nado_params, nado_shard)
        else:  # frozen NADO: params only, no optimizer state
            nado_state = ModelState(jnp.zeros((), jnp.int32), _copy(nado_params), ())
            nado_shard = ModelState(replicated(mesh), nado_pshard, ())

    ref_pshard = lm_pshard
    if base:
        reference, ref_pshard = base
    elif reference is None:
        reference = lm_params
    elif isinstance(reference, nnx.Module):
        reference = split_params(reference)[2]
    dtype = jnp.dtype(reference_dtype) if reference_dtype else None
    ref_params = cast_params(reference, dtype, ref_pshard) if dtype else _copy(reference)

    if lm_opt is not None:
        lm_state = init_model_state(lm_opt, lm_params, lm_shard)
    else:
        lm_state = ModelState(jnp.zeros((), jnp.int32), _copy(lm_params), ())
        lm_shard = ModelState(replicated(mesh), lm_pshard, ())
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated(mesh))
    state = TrainState(lm=lm_state, nado=nado_state, ref_params=ref_params, rng=rng)
    shardings = TrainState(
        lm=lm_shard, nado=nado_shard, ref_params=ref_pshard, rng=replicated(mesh)
    )
    models = Models(
        lm=lm_graph,
        nado=nado_graph,
        lm_optimizer=lm_opt,
        nado_optimizer=nado_opt,
        lm_schedule=lm_sched,
        nado_schedule=nado_sched,
        lm_trainable=lm_mask,
        nado_trainable=nado_mask,
        lora=base is not None,
        ref=None if base is None else nnx.split(abstract_model(lm.config), nnx.Param)[0],
    )
    return Training(state, models, shardings)
