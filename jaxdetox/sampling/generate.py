"""Model-level entry points: `generate` (`LanguageModel.generate`, DESIGN.md §4) and
`lm_sampler`, the cached `Sampler` for a `LanguageModel` (optionally with a NADO)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdetox.sampling.adapters import decode_model_for
from jaxdetox.sampling.sampler import Sampler, to_host
from jaxdetox.sampling.types import SamplingConfig

# (LM graph, NADO graph, mesh) -> Sampler: same architectures share compiled executables.
_SAMPLERS: dict[tuple, Sampler] = {}


def lm_sampler(lm: Any, nado: Any = None) -> tuple[Sampler, Any, Any]:
    """`(sampler, lm_params, nado_params)` for a `LanguageModel` (and optional NADO module).

    `nado`: a `NadoModel` (separate body with its own cache, or shared head on the LM's
    hidden states), or any module / `LanguageModel` whose logits serve as `h_φ`.
    """
    model, params = decode_model_for(lm.model)
    nado_model, nado_params = None, None
    if nado is not None:
        nado_model, nado_params = decode_model_for(getattr(nado, "model", nado))
    mesh = getattr(lm, "mesh", None)
    key = (model, nado_model, mesh)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = Sampler(model, nado_model, mesh=mesh)
    return _SAMPLERS[key], params, nado_params


def special_tokens(config: Any) -> tuple[tuple[int, ...], int]:
    """Stop tokens and pad token from a model config (pad falls back to the first EOS, then 0)."""
    eos = config.eos_token_id
    eos_ids = () if eos is None else (int(eos),) if isinstance(eos, int) else tuple(eos)
    pad = config.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad)


def generate(
    lm: Any,
    tokens: np.ndarray | jax.Array,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    **options: Any,
) -> jax.Array:
    """Continue unpadded prompts `[B, T]` -> int32 `[B, T + max_new_tokens]`; 0.0 = greedy.

    Rows stop at the config's EOS token(s), after which they hold the pad token (as
    transformers' `generate` pads finished rows). `options` are further `SamplingConfig`
    fields (e.g. `eos_token_ids=()`, `cache_dtype="bfloat16"`).
    """
    tokens_bt = np.asarray(tokens)
    if tokens_bt.ndim != 2 or tokens_bt.shape[1] == 0:
        raise ValueError(f"generate: tokens must be int [B, T] with T >= 1, got {tokens_bt.shape}")
    eos_ids, pad = special_tokens(lm.config)
    fields = {"eos_token_ids": eos_ids, "pad_token_id": pad, **options}  # options win
    config = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        **fields,
    )
    sampler, params, _ = lm_sampler(lm)
    out = sampler.sample(params, tokens_bt.astype(np.int32).tolist(), config)
    new_bn = to_host(out.tokens)  # whole array on every process of a multi-host mesh
    return jnp.asarray(np.concatenate([tokens_bt.astype(np.int32), new_bn], axis=1))
