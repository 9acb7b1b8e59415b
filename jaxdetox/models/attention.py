"""The attention kernel of every layer, and which implementation runs it (`model.attention`).

`ModelConfig.attention` (run config `model.attention`) is one of:

- `einsum`: the reference, two einsums around a float32 softmax that materialise the
  `[B, KVH, G, T, S]` scores; its dots read the decode form's heads-major cache in place;
- `xla`: `jax.nn.dot_product_attention(implementation="xla")`, the same maths through JAX's
  own XLA lowering (what the TPU and non-cuDNN GPU paths build on);
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash
  attention (NVIDIA GPUs, bfloat16/float16, head_dim a multiple of 8 up to 128): no
  `[T, S]` scores in memory, the long-context training path;
- `auto` (default): `cudnn` on a CUDA GPU where cuDNN supports the call (no KV cache: the
  training and teacher-forced forwards), `einsum` on CPU, `xla` elsewhere.

Why `einsum` stays the CPU default: on this 2-core CPU the two measured within noise of
each other (GQA, f32, [8, 128, 8 heads / 2 KV heads, 64] forward 5.7 vs 4.1 ms, gradient
10.8 vs 8.8 ms; a [32, 1] decode step against a 256-slot cache 0.90 vs 1.11 ms; minimum of
40 interleaved runs, load ~6), the decode form and the sampler benchmarks were tuned on
it, and the memory planner's tests are calibrated against its compiled temporaries.
Why calls with a KV cache stay on XLA under `auto` on GPU: the decode step has one query
row, which flash attention does not speed up, and cuDNN wants `[B, S, KVH, Dh]` operands,
so the heads-major cache would be transposed (copied) in every layer at every step.

Masks (segment ids, padding, causality, sliding window) all arrive as one boolean
`[B, T, S]` visibility mask, passed to `jax.nn.dot_product_attention` as its `mask`
(cuDNN folds it into an additive bias). A query that sees no key (padding) gets a uniform
row in every implementation, never NaN.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdetox.models.config import ATTENTION_IMPLEMENTATIONS

F32 = jnp.float32
# Finite "minus infinity": a query with no visible key (padding) gets a uniform row, not NaN.
MASK_VALUE = float(np.finfo(np.float32).min)
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper and later; 128 holds on every cuDNN flash GPU
CUDNN_MIN_COMPUTE_CAPABILITY = (8, 0)  # Ampere: cuDNN's fused flash attention


class Platform(NamedTuple):
    """What `select_attention` needs to know about the machine (fake it in tests)."""

    name: str  # jax.default_backend(): "cpu" | "gpu" | "tpu"
    cudnn: bool  # CUDA GPU of compute capability >= 8.0 with cuDNN loaded


@functools.cache
def current_platform() -> Platform:
    """The default backend, and whether cuDNN flash attention can run on it."""
    name = jax.default_backend()
    if name != "gpu":
        return Platform(name, False)
    device = jax.devices()[0]
    try:  # jax's own check in its cuDNN path ("cuDNN is not detected")
        from jax._src.lib import cuda_versions
    except ImportError:  # pragma: no cover - depends on the jax build
        cuda_versions = None
    capability = getattr(device, "compute_capability", "0.0")
    major_minor = tuple(int(x) for x in str(capability).split(".")[:2])
    cuda = "cuda" in getattr(device.client, "platform_version", "").lower()
    ok = cuda and cuda_versions is not None and major_minor >= CUDNN_MIN_COMPUTE_CAPABILITY
    return Platform(name, bool(ok))


def cudnn_unsupported(dtype: jnp.dtype, head_dim: int, q_len: int, kv_len: int) -> str | None:
    """Why cuDNN flash attention cannot run a call of this dtype and these shapes (None: it
    can). The conditions of jax's cuDNN path for bfloat16/float16 with a bias (the mask)."""
    if jnp.dtype(dtype) not in CUDNN_DTYPES:
        return f"dtype {jnp.dtype(dtype).name} (cuDNN needs bfloat16 or float16)"
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return f"head_dim {head_dim} (cuDNN needs a multiple of 8, at most {CUDNN_MAX_HEAD_DIM})"
    if q_len % 2 or kv_len % 2:  # its backward with a bias
        return f"lengths {q_len} x {kv_len} (cuDNN with a mask needs even lengths)"
    return None


def select_attention(
    requested: str,
    *,
    platform: Platform,
    dtype: jnp.dtype,
    head_dim: int,
    q_len: int,
    kv_len: int,
    cached: bool,
) -> str:
    """The implementation (`einsum` | `xla` | `cudnn`) that `requested` resolves to for one
    call; `cached`: the call reads a KV cache. An explicit `cudnn` the platform or the call
    cannot run is an error naming the reason."""
    if requested not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention = {requested!r}; expected one of {ATTENTION_IMPLEMENTATIONS}"
        )
    why_not = None if platform.cudnn else f"platform {platform.name!r} without cuDNN"
    why_not = why_not or cudnn_unsupported(dtype, head_dim, q_len, kv_len)
    if requested == "cudnn":
        if why_not:
            raise ValueError(
                f"model.attention = 'cudnn' cannot run here: {why_not}; use 'auto' or 'xla'"
            )
        return "cudnn"
    if requested != "auto":
        return requested
    if platform.name == "cpu":
        return "einsum"
    return "cudnn" if why_not is None and not cached else "xla"


def attend(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    mask_bts: jax.Array,
    implementation: str,
) -> jax.Array:
    """`softmax(q·kᵀ/√Dh, masked)·v` with grouped KV heads (query head j reads KV head
    j // G, HF's repeat_kv order): `[B, T, N, Dh]` in the queries' dtype. Scores and
    softmax are float32 in every implementation; keys/values are read in their own dtype
    (a wider cache promotes the small queries, never the other way round)."""
    dt = q_btnh.dtype
    b, t, n, h = q_btnh.shape
    kvh = k_bskh.shape[2]
    if implementation == "einsum":
        q_btkgh = q_btnh.reshape(b, t, kvh, n // kvh, h)
        scores_bkgts = jnp.einsum(
            "BTKGH,BSKH->BKGTS", q_btkgh, k_bskh, preferred_element_type=F32
        ) * (1.0 / math.sqrt(h))
        scores_bkgts = jnp.where(mask_bts[:, None, None, :, :], scores_bkgts, MASK_VALUE)
        probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(dt)
        out_btkgh = jnp.einsum("BKGTS,BSKH->BTKGH", probs_bkgts, v_bskh)
        return out_btkgh.reshape(b, t, n, h).astype(dt)
    wide = jnp.promote_types(dt, k_bskh.dtype)  # jax.nn wants one dtype for q, k and v
    out_btnh = jax.nn.dot_product_attention(
        q_btnh.astype(wide),
        k_bskh.astype(wide),
        v_bskh.astype(wide),
        mask=mask_bts[:, None, :, :],
        implementation=implementation,
    )
    return out_btnh.astype(dt)
