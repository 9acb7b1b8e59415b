"""`TrainState`: everything a train step reads and writes, as one pytree of arrays.

Parameters are *pure dicts* (`nnx.to_pure_dict` of a model's `nnx.Param` state): plain
nested dicts of arrays that optax, orbax and `jax.jit` shardings take as they are. A step
rebuilds a module with `nnx.merge(graphdef, params)` inside the trace, so the static model
structure (`graphdef`) lives in `Models`, never in the state.

Shardings come from the parameters' logical axis names through `jaxdetox.sharding`'s one
rules table; optimizer states mirror the parameter tree, and every leaf optax adds beside
it (Adam's step `count`, schedules' counters) is replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdetox import sharding

Params = dict[str, Any]


@flax.struct.dataclass
class ModelState:
    """One trained model: its parameters, optimizer state and update counter."""

    step: jax.Array  # int32 scalar: optimizer updates applied in this stage
    params: Params
    opt_state: Any


@flax.struct.dataclass
class TrainState:
    """The LLM, the NADO (each with its optimizer state), the frozen reference LLM, an RNG.

    `lm` / `nado` may be None for stages that train only one of them; `ref_params` is the
    reference LLM the guided teacher is built from (None when no step needs a teacher).
    The parallel scheme's joint stage trains NADO_i and LLM_i together, each as its own
    stage would: `nado_ref_params` is the model the NADO decomposes when it is another than
    the teacher's reference (the LLM that drew the samples), `teacher_nado_params` the
    teacher's NADO when it is not `nado`'s current parameters (NADO_{i−1}, frozen while
    NADO_i trains). None: `ref_params` and `nado.params` serve both.
    """

    lm: ModelState | None
    nado: ModelState | None
    ref_params: Params | None
    rng: jax.Array  # uint32 key data [2]
    nado_ref_params: Params | None = None
    teacher_nado_params: Params | None = None

    @property
    def nado_reference(self) -> Params | None:
        """The reference LLM of the NADO's loss (its R decomposes this model)."""
        return self.ref_params if self.nado_ref_params is None else self.nado_ref_params

    @property
    def teacher_nado(self) -> Params | None:
        """The NADO of the LLM's teacher (None without one)."""
        if self.teacher_nado_params is not None:
            return self.teacher_nado_params
        return None if self.nado is None else self.nado.params


@dataclasses.dataclass(frozen=True, eq=False)
class Models:
    """Static half of the train step: graph definitions and optimizers (no arrays)."""

    lm: nnx.GraphDef
    nado: nnx.GraphDef | None = None
    lm_optimizer: optax.GradientTransformation | None = None
    nado_optimizer: optax.GradientTransformation | None = None
    lm_schedule: Any = None
    nado_schedule: Any = None
    # Bool pytrees like the params (python bools): which leaves train. None = all.
    lm_trainable: Any = None
    nado_trainable: Any = None
    # LoRA (models/lora.py): `lm.params` are the adapters only and `ref_params` the frozen
    # base weights, shared by the student (base ⊕ adapters) and the reference; `ref` is the
    # base model's graph (the reference runs without adapters).
    lora: bool = False
    ref: nnx.GraphDef | None = None
    # Several constraints: `nado.params` is a dict of one NADO's params per constraint name
    # (all of the `nado` graph), in the order their guidance terms are summed.
    nado_names: tuple[str, ...] | None = None

    def student_params(self, lm_params: Params, ref_params: Params | None) -> Params:
        """The LLM's full params: `lm_params`, or with LoRA the base plus the adapters."""
        if not self.lora:
            return lm_params
        from jaxdetox.models.lora import combine

        return combine(jax.lax.stop_gradient(ref_params), lm_params)


def split_params(module: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, Params]:
    """`(graphdef, abstract nnx state with sharding metadata, pure-dict params)` of a module."""
    graphdef, state = nnx.split(module, nnx.Param)
    abstract = jax.tree.map(
        lambda v: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return graphdef, abstract, nnx.to_pure_dict(state)


def to_nnx_state(abstract_state: nnx.State, params: Params) -> nnx.State:
    """An nnx State (Variables with their metadata, e.g. logical axes) holding `params`."""
    flat = []
    for path, var in nnx.to_flat_state(abstract_state):
        value = params
        for key in path:
            value = value[key]
        flat.append((path, var.replace(value)))
    return nnx.from_flat_state(flat)


def bind(graphdef: nnx.GraphDef, params: Params) -> nnx.Module:
    """The module for these pure-dict params (inside jit: traced, nothing copied)."""
    return nnx.merge(graphdef, params)


def param_shardings(abstract_state: nnx.State, mesh: Mesh) -> Params:
    """Pure dict of NamedSharding for a model's params, from their logical axes."""
    return nnx.to_pure_dict(sharding.state_shardings(abstract_state, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def key_path(path: tuple) -> tuple[str, ...]:
    """A jax key path as plain strings (dict keys, attribute names, sequence indices)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def opt_state_shardings(
    optimizer: optax.GradientTransformation,
    abstract_params: Params,
    params_sharding: Params,
    mesh: Mesh,
) -> Any:
    """Shardings for `optimizer.init(params)`: a leaf whose key path ends with a parameter's
    path and has its shape (Adam's moments, however deeply optax nests them, e.g. under
    `multi_transform`) follows that parameter; every other leaf (counters) is replicated."""
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_shardings = jax.tree.leaves(
        params_sharding, is_leaf=lambda x: isinstance(x, NamedSharding)
    )
    by_path = {
        key_path(path): (tuple(x.shape), s) for (path, x), s in zip(flat_params, flat_shardings)
    }
    rep = replicated(mesh)

    def leaf_sharding(path: tuple, leaf: Any) -> NamedSharding:
        keys = key_path(path)
        for start in range(len(keys)):
            match = by_path.get(keys[start:])
            if match is not None and match[0] == tuple(leaf.shape):
                return match[1]
        return rep

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt)


def model_state_shardings(
    optimizer: optax.GradientTransformation,
    abstract_params: Params,
    params_sharding: Params,
    mesh: Mesh,
) -> ModelState:
    """Shardings of a `ModelState` for this optimizer."""
    return ModelState(
        step=replicated(mesh),
        params=params_sharding,
        opt_state=opt_state_shardings(optimizer, abstract_params, params_sharding, mesh),
    )


def init_model_state(
    optimizer: optax.GradientTransformation, params: Params, shardings: ModelState | None = None
) -> ModelState:
    """A fresh `ModelState` (step 0); the optimizer state is created already sharded."""
    init = jax.jit(
        lambda p: ModelState(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
        out_shardings=shardings,
    )
    return init(params)


def cast_params(params: Params, dtype: Any, shardings: Params | None = None) -> Params:
    """A copy of `params` with floating leaves in `dtype` (e.g. a bf16 frozen reference)."""

    def cast(x: jax.Array) -> jax.Array:
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=shardings)(params)


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs (with shardings when given) for a concrete or abstract tree."""
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            tree,
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
