"""Host-side sampling: prompt bucketing, a compile cache that counts compilations, sharded
inputs, and `sample_prompts`, the batched driver with a progress bar.

A `Sampler` is made once per model graph (and NADO graph) and called with parameters each
time, so Phase-2 loops that update parameters every iteration reuse the executables. Each
executable is keyed by everything that fixes the compiled program: the static sampling
spec, batch size, prompt bucket, and shapes/dtypes/shardings of all arguments.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdetox import sharding
from jaxdetox.data.packing import left_pad
from jaxdetox.sampling.decode import DecodeModel, Params, sample_loop
from jaxdetox.sampling.decode_form import DecodeParams
from jaxdetox.sampling.types import SampleOutput, SamplingConfig

logger = logging.getLogger(__name__)


def bucket_length(length: int, multiple: int) -> int:
    """Round a prompt length up to a multiple of `multiple` (at least `multiple`)."""
    return max(multiple, int(math.ceil(length / multiple)) * multiple)


def _leaf_signature(leaf: Any) -> tuple:
    """Shape, dtype and (for committed jax arrays) sharding of one argument leaf."""
    placement = getattr(leaf, "sharding", None) if isinstance(leaf, jax.Array) else None
    return (tuple(np.shape(leaf)), str(jnp.result_type(leaf)), placement)


def _signature(tree: Any) -> tuple:
    """Hashable description of a pytree's structure, shapes, dtypes and shardings."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple(_leaf_signature(leaf) for leaf in leaves))


class Sampler:
    """Compiled, bucketed sampling for one model (plus an optional NADO for guided decoding).

    `mesh` (optional) shards the batch over `batch_axes`; parameters keep whatever sharding
    they arrive with (place them with `jaxdetox.sharding` first). On a mesh that spans
    several processes, every process calls with the same prompts (one SPMD program); the
    outputs are then global arrays (`to_host` gathers them; `sample_prompts` does).
    """

    def __init__(
        self,
        model: DecodeModel,
        nado: DecodeModel | None = None,
        *,
        mesh: Mesh | None = None,
        batch_axes: tuple[str, ...] | str | None = None,
    ) -> None:
        """Hold the models; nothing is compiled until the first call."""
        self.model = model
        self.nado = nado
        self.mesh = mesh
        if mesh is not None and batch_axes is None:
            batch_axes = _default_batch_axes(mesh)
        self.batch_axes = batch_axes
        self._executables: dict[tuple, Any] = {}
        # Jitted once, so re-preparing updated weights (one call per run) reuses the program.
        self._prepare_fns = tuple(
            jax.jit(m.prepare_params) if hasattr(m, "prepare_params") else None
            for m in (model, nado)
        )
        self.compile_count = 0
        self.compile_seconds = 0.0

    @property
    def batch_multiple(self) -> int:
        """Batch sizes are padded to a multiple of this (the data-parallel device count)."""
        if self.mesh is None or self.batch_axes is None:
            return 1
        axes = (self.batch_axes,) if isinstance(self.batch_axes, str) else self.batch_axes
        return int(np.prod([self.mesh.shape[a] for a in axes]))

    def _place_batch(self, array: np.ndarray) -> jax.Array:
        """Put a batch-leading array on the mesh (batch sharded) or the default device."""
        if self.mesh is None:
            return jnp.asarray(array)
        spec = PartitionSpec(self.batch_axes, *([None] * (array.ndim - 1)))
        return jax.device_put(array, NamedSharding(self.mesh, spec))

    def sample_padded(
        self,
        params: Params,
        prompt_bp: np.ndarray,
        segment_ids_bp: np.ndarray,
        config: SamplingConfig,
        *,
        nado_params: Params | None = None,
        row_base: np.ndarray | None = None,
    ) -> SampleOutput:
        """Sample from already left-padded prompts (`[B, P]`, segment ids 0 on padding).

        `P` is used as is (pad it to a bucket yourself, or use `sample`); `B` must be a
        multiple of `batch_multiple`. `row_base` (default `arange(B)`) seeds the rows.
        """
        if (self.nado is None) != (nado_params is None):
            raise ValueError("sampling: pass nado_params exactly when the Sampler has a nado")
        batch = prompt_bp.shape[0]
        if batch % self.batch_multiple:
            raise ValueError(
                f"sampling: batch {batch} is not a multiple of the {self.batch_multiple} "
                "data-parallel devices; use `sample`, which pads the batch"
            )
        row_base = np.arange(batch, dtype=np.int32) if row_base is None else row_base
        args = (
            params,
            nado_params,
            self._place_batch(np.asarray(prompt_bp, np.int32)),
            self._place_batch(np.asarray(segment_ids_bp, np.int32)),
            self._place_batch(np.asarray(row_base, np.int32)),
            config.runtime_values(),
        )
        spec = config.static_spec()
        key = (spec, _signature(args))
        executable = self._executables.get(key)
        if executable is None:
            executable = self._compile(spec, args)
            self._executables[key] = executable
        return executable(*args)

    def _compile(self, spec: Any, args: tuple) -> Any:
        """Trace, lower and compile the sampling loop for these argument shapes; log it."""
        start = time.perf_counter()

        def run(params, nado_params, prompt_bp, segment_ids_bp, row_base_b, values):  # noqa: ANN001, ANN202
            return sample_loop(
                self.model, self.nado, spec, params, nado_params,
                prompt_bp, segment_ids_bp, row_base_b, values,
            )  # fmt: skip

        with self._mesh_scope():
            executable = jax.jit(run).lower(*args).compile()
        seconds = time.perf_counter() - start
        self.compile_count += 1
        self.compile_seconds += seconds
        batch, prompt_len = args[2].shape
        logger.info(
            "sampler compile #%d: batch=%d prompt_bucket=%d new=%d k=%d guided=%s (%.1f s)",
            self.compile_count, batch, prompt_len, spec.max_new_tokens, spec.num_samples,
            self.nado is not None, seconds,
        )  # fmt: skip
        return executable

    def prepare(self, params: Params, nado_params: Params | None = None) -> tuple[Params, Any]:
        """`(params, nado_params)` in the models' decode form (`prepare_params`), made once.

        Pass the result to `sample` / `sample_padded` for many batches with the same
        weights (`sample_prompts` does): the per-layer weight copies the decode loop reads
        are then made here instead of inside every call. They live as long as the result
        (one extra copy of the layer weights). Models without a decode form pass through.
        """

        prepared = []
        for prepare_fn, tree in zip(self._prepare_fns, (params, nado_params)):
            if prepare_fn is not None and tree is not None and not isinstance(tree, DecodeParams):
                with self._mesh_scope():
                    tree = prepare_fn(tree)
            prepared.append(tree)
        return prepared[0], prepared[1]

    def _mesh_scope(self) -> contextlib.AbstractContextManager:
        """`jax.set_mesh(self.mesh)` for tracing under the mesh, or a no-op without one."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def sample(
        self,
        params: Params,
        prompts: Sequence[Sequence[int]],
        config: SamplingConfig,
        *,
        nado_params: Params | None = None,
        prompt_ids: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> SampleOutput:
        """Sample `config.num_samples` completions for each prompt (token lists), one batch.

        Prompts are left-padded to a bucket of `config.prompt_bucket`, the batch is padded
        to `batch_size` (default: a multiple of the data-parallel devices) with dummy rows
        that are dropped. `prompt_ids` (default `0..B-1`) are the prompts' global indices;
        they seed the draws, so a prompt gets the same completions in any batch.
        """
        num = len(prompts)
        target = batch_size or num
        target = int(math.ceil(target / self.batch_multiple)) * self.batch_multiple
        if target < num:
            raise ValueError(f"sampling: {num} prompts do not fit batch_size={batch_size}")
        prompt_len = bucket_length(max(len(p) for p in prompts), config.prompt_bucket)
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        if empty:
            raise ValueError(f"sampling: prompt {empty[0]} is empty; every prompt needs >= 1 token")
        filler = [[config.pad_token_id]] * (target - num)
        prompt_bp, segment_ids_bp = left_pad(
            list(prompts) + filler, prompt_len, config.pad_token_id
        )
        ids = np.arange(num) if prompt_ids is None else np.asarray(prompt_ids)
        row_base = np.concatenate([ids, np.zeros(target - num, ids.dtype)]).astype(np.int32)
        out = self.sample_padded(
            params, prompt_bp, segment_ids_bp, config, nado_params=nado_params, row_base=row_base
        )
        rows = num * config.num_samples
        return jax.tree.map(lambda x: x[:rows], out)


def to_host(tree: Any) -> Any:
    """Numpy copies of a pytree of arrays. Arrays that span several processes (a multi-host
    mesh) are all-gathered first, so every process gets the whole array."""

    def fetch(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)


def _default_batch_axes(mesh: Mesh) -> tuple[str, ...] | None:
    """Mesh axes the batch is sharded over: the rules table's `batch` entry."""
    axes = dict(sharding.LOGICAL_AXIS_RULES).get("batch")
    if axes is None:
        return None
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if a in mesh.shape) or None


def sample_batches(
    sampler: Sampler,
    params: Params,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig,
    *,
    batch_size: int = 32,
    nado_params: Params | None = None,
    skip: Collection[int] = (),
    progress: bool = True,
    description: str = "sampling",
) -> Iterator[tuple[np.ndarray, SampleOutput]]:
    """The long-job sampling driver: yields `(index_b, out)` per batch of prompts, as done.

    `index_b` are positions in `prompts`; `out` holds `num_samples` consecutive rows per
    prompt of `index_b`, as numpy on every process of a multi-host mesh (`to_host`).
    Prompts at the positions in `skip` (e.g. already stored) are left out. The rest go
    longest first (similar lengths share a bucket, so less padding). A prompt's draws are
    seeded by its position, so results depend neither on `batch_size` nor on `skip`. The
    decode-form weights are made once (`Sampler.prepare`); a tqdm bar shows prompts/s,
    tokens/s and the ETA.
    """
    from tqdm.auto import tqdm

    skipped = {int(i) for i in skip}
    todo = sorted(
        (i for i in range(len(prompts)) if i not in skipped), key=lambda i: -len(prompts[i])
    )
    if todo and config.max_new_tokens > 1:  # decode-form weights once for all batches
        params, nado_params = sampler.prepare(params, nado_params)
    new_tokens, start = 0, time.perf_counter()
    with tqdm(
        total=len(prompts), initial=len(prompts) - len(todo), desc=description, unit="prompt",
        disable=not progress,
    ) as bar:  # fmt: skip
        for begin in range(0, len(todo), batch_size):
            index_b = np.asarray(todo[begin : begin + batch_size])
            out = sampler.sample(
                params,
                [prompts[i] for i in index_b],
                config,
                nado_params=nado_params,
                prompt_ids=index_b,
                batch_size=batch_size,
            )
            out = to_host(out)
            new_tokens += int(out.lengths.sum())
            bar.update(len(index_b))
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.1f}")
            yield index_b, out


def sample_prompts(
    sampler: Sampler,
    params: Params,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig,
    *,
    batch_size: int = 32,
    nado_params: Params | None = None,
    progress: bool = True,
    description: str = "sampling",
) -> SampleOutput:
    """Every batch of `sample_batches`, as numpy arrays in the input order: rows
    `i * num_samples ... i * num_samples + num_samples - 1` continue prompt `i`."""
    if not prompts:
        raise ValueError("sample_prompts: no prompts given")
    k = config.num_samples
    parts = list(
        sample_batches(
            sampler, params, prompts, config, batch_size=batch_size, nado_params=nado_params,
            progress=progress, description=description,
        )
    )  # fmt: skip
    # Scatter the batches back to input order: prompt i owns rows i*k .. i*k + k - 1.
    rows = np.concatenate([(ids[:, None] * k + np.arange(k)).reshape(-1) for ids, _ in parts])
    inverse = np.empty_like(rows)
    inverse[rows] = np.arange(len(rows))
    return jax.tree.map(lambda *xs: np.concatenate(xs)[inverse], *[o for _, o in parts])
