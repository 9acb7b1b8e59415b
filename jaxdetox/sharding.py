"""Device mesh and the one table that maps logical axis names to mesh axes.

Model code names logical axes only (`batch`, `embed`, `heads`, ...); this module decides
where they live on the mesh `(data, fsdp, tensor)`. Resolution is shape-aware: a mesh axis
is used for a dimension only if it divides it and is not already used by an earlier
dimension of the same array, so one table serves every mesh shape, tiny test models
included (a dimension that cannot be split stays replicated rather than failing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis / axes / None. Earlier dims of an array claim mesh axes first,
# so activations `(batch, length, embed)` put batch on data+fsdp and leave embed replicated,
# while weights `(embed, mlp)` put embed on fsdp (ZeRO-3 style) and mlp on tensor.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
    ("positions", None),
)

LogicalAxes = Sequence[str | None]


def make_mesh(
    shape: Sequence[int] | Mapping[str, int] = (-1, 1, 1),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A `(data, fsdp, tensor)` mesh with Auto axis types; one `-1` entry takes the rest."""
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh: unknown axes {sorted(unknown)}; expected {MESH_AXES}")
        shape = [shape.get(a, 1) for a in MESH_AXES]
    dims = [int(s) for s in shape]
    if len(dims) != len(MESH_AXES):
        raise ValueError(f"mesh shape {dims} must have {len(MESH_AXES)} entries {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    if dims.count(-1) > 1:
        raise ValueError(f"mesh shape {dims}: at most one -1 entry")
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1)
        if len(devices) % known:
            raise ValueError(f"mesh shape {dims}: {len(devices)} devices not divisible by {known}")
        dims[dims.index(-1)] = len(devices) // known
    if math.prod(dims) != len(devices):
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices, "
            f"have {len(devices)}"
        )
    grid = np.asarray(devices, dtype=object).reshape(dims)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(
    logical_axes: LogicalAxes,
    shape: Sequence[int] | None = None,
    mesh: Mesh | Any | None = None,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes (shape-aware when shape+mesh given)."""
    table: dict[str, list[tuple[str, ...]]] = {}
    for name, target in rules:
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        table.setdefault(name, []).append(axes)
    sizes = dict(mesh.shape) if mesh is not None else {}
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(logical_axes):
        chosen: tuple[str, ...] = ()
        for candidate in table.get(name, [()]) if name is not None else [()]:
            picked: list[str] = []
            extent = 1
            for axis in candidate:
                if axis in used or (mesh is not None and axis not in sizes):
                    continue
                size = sizes.get(axis, 1)
                if shape is not None and mesh is not None and shape[dim] % (extent * size):
                    continue
                picked.append(axis)
                extent *= size
            if picked:
                chosen = tuple(picked)
                break
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh, logical_axes: LogicalAxes, shape: Sequence[int] | None = None
) -> NamedSharding:
    """NamedSharding on `mesh` for an array with these logical axes."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def _var_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    axes = var.get_metadata().get("out_sharding") or ()
    return tuple(axes) + (None,) * (len(var.shape) - len(axes))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """Tree of NamedSharding matching an nnx State (concrete or abstract) from its metadata."""
    return jax.tree.map(
        lambda v: v.replace(named_sharding(mesh, _var_axes(v), v.shape)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def place_variable(value: np.ndarray, var: nnx.Variable, mesh: Mesh | None) -> jax.Array:
    """device_put a host array for `var` with its logical sharding (default device if no mesh)."""
    if mesh is None:
        return jax.device_put(value)
    return jax.device_put(value, named_sharding(mesh, _var_axes(var), var.shape))


def shard_state(state: Any, mesh: Mesh) -> Any:
    """Place every array of an nnx State on `mesh` according to its logical axes."""
    return jax.device_put(state, state_shardings(state, mesh))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Sharding for a `[B, T, ...]` batch array: batch split over data+fsdp when it divides."""
    axes = ("batch", "length") + (None,) * (len(shape) - 2)
    return named_sharding(mesh, axes[: len(shape)], shape)


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """Sharding constraint for an activation when a mesh is set (`jax.set_mesh`); else no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not all(t == AxisType.Auto for t in mesh.axis_types):
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)
