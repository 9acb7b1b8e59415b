"""Sampler configuration and outputs."""

from __future__ import annotations

import dataclasses
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = Union[jax.Array, np.ndarray]

_CACHE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample completions; `temperature=0` is greedy decoding.

    Fields that fix shapes or code paths (`max_new_tokens`, `num_samples`, `top_k`,
    greedy-or-not, top-p-or-not, `cache_dtype`, the number of stop tokens rounded up to a
    multiple of 4) are compiled in; `temperature`, `top_p`, `alpha`, `seed`, the stop-token
    values and `pad_token_id` are runtime values and never trigger a recompile.
    """

    max_new_tokens: int = 20
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1  # completions per prompt; the prompt is prefilled once
    eos_token_ids: tuple[int, ...] = ()  # any of these ends a row (it is kept in the output)
    pad_token_id: int = 0  # emitted after a row has ended, and used for left padding
    alpha: float = 1.0  # NADO guidance strength (docs/method.md), guided decoding only
    # KV cache storage: None (default) = the model's compute dtype, or float32 | bfloat16 |
    # float16. Keys and values are computed in the compute dtype, so a wider cache holds
    # the same values at twice the memory: float32 pays off only with a float32 model.
    cache_dtype: str | None = None
    prompt_bucket: int = 16  # prompts are left-padded to a multiple of this
    seed: int = 0

    def __post_init__(self) -> None:
        """Validate ranges so a bad value fails here rather than deep inside jit."""
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0.0, "temperature must be >= 0 (0 = greedy)"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1] (1 = off)"),
            (self.num_samples >= 1, "num_samples must be >= 1"),
            (self.prompt_bucket >= 1, "prompt_bucket must be >= 1"),
            (
                self.cache_dtype is None or self.cache_dtype in _CACHE_DTYPES,
                f"cache_dtype must be None (the compute dtype) or one of {list(_CACHE_DTYPES)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingConfig: {message}, got {self}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax (temperature 0)."""
        return self.temperature == 0.0

    def static_spec(self) -> StaticSpec:
        """The compiled-in part of this config."""
        return StaticSpec(
            max_new_tokens=self.max_new_tokens,
            num_samples=self.num_samples,
            top_k=self.top_k,
            greedy=self.greedy,
            use_top_p=(not self.greedy) and self.top_p < 1.0,
            cache_dtype=self.cache_dtype,
        )

    def runtime_values(self) -> RuntimeValues:
        """The traced part of this config (changing it does not recompile)."""
        # Stop ids padded with -1 (never a token) to a multiple of 4: few distinct shapes.
        num_stop = 4 * max(1, -(-len(self.eos_token_ids) // 4))
        stop_ids = list(self.eos_token_ids) + [-1] * (num_stop - len(self.eos_token_ids))
        return RuntimeValues(
            stop_ids=jnp.asarray(stop_ids, jnp.int32),
            pad_token_id=jnp.int32(self.pad_token_id),
            temperature=jnp.float32(self.temperature if self.temperature > 0 else 1.0),
            top_p=jnp.float32(self.top_p),
            alpha=jnp.float32(self.alpha),
            seed=jnp.uint32(self.seed),
        )


@dataclasses.dataclass(frozen=True)
class StaticSpec:
    """Hashable compile-time parameters of the sampling loop."""

    max_new_tokens: int
    num_samples: int
    top_k: int
    greedy: bool
    use_top_p: bool
    cache_dtype: str | None

    @property
    def cache_jnp_dtype(self) -> Any:
        """The KV cache dtype as a jnp dtype (None: the model's compute dtype)."""
        return None if self.cache_dtype is None else _CACHE_DTYPES[self.cache_dtype]


@struct.dataclass
class RuntimeValues:
    """Traced sampling parameters."""

    stop_ids: jax.Array  # int32 [E], -1 = unused slot
    pad_token_id: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    alpha: jax.Array
    seed: jax.Array


@struct.dataclass
class SampleOutput:
    """Completions for `N = num_prompts * num_samples` rows (row `i` continues prompt `i // k`).

    - `tokens` int32 `[N, max_new_tokens]`: generated tokens; a stop token is kept, every
      later slot holds `pad_token_id`.
    - `lengths` int32 `[N]`: generated tokens per row, stop token included.
    - `logprobs` float32 `[N, max_new_tokens]`: log-prob of each token under the
      distribution it was drawn from (after temperature/top-k/top-p); 0 for greedy and
      after the end.
    - `model_logprobs`: under the untempered, unfiltered model distribution (for guided
      decoding that model is the guided teacher q, docs/method.md).
    - `base_logprobs`: guided decoding only, under the base LM alone; else None.
    - `prompt_index` int32 `[N]`: which prompt each row continues.
    """

    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    model_logprobs: jax.Array
    base_logprobs: Any
    prompt_index: jax.Array

    @property
    def mask(self) -> jax.Array:
        """bool `[N, max_new_tokens]`: True on generated (non-padding) slots."""
        steps = np.arange(self.tokens.shape[1])  # numpy in, numpy out; jax in, jax out
        return steps[None, :] < self.lengths[:, None]


def special_tokens(config: Any) -> tuple[tuple[int, ...], int]:
    """Stop tokens and pad token from a model config (pad falls back to the first EOS, then 0)."""
    eos = config.eos_token_id
    eos_ids = () if eos is None else (int(eos),) if isinstance(eos, int) else tuple(eos)
    pad = config.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad)
