"""Jit-compiled batched sampling with a KV cache: warpers, guided (NADO) decoding, drivers.

- `SamplingConfig`, `SampleOutput` (types.py)
- `warp_logits` and friends (warpers.py): temperature / top-k / top-p as in transformers
- `sample_loop` (decode.py): prefill + decode, one pure function, jit-able
- `Sampler`, `sample_prompts`, `to_host` (sampler.py): bucketing, compile cache, sharding
  (multi-host included), progress bar
- `NnxLM`, `NnxSharedNado`, `decode_model_for` (adapters.py): the Flax models as
  `DecodeModel`s; a `CausalLM` decodes in its decode form (decode_form.py)

`LanguageModel.generate` and `lm_sampler` (a `Sampler` for a `LanguageModel`) live in
`jaxdetox.lm`, above this package.
"""

from jaxdetox.sampling.adapters import NnxLM, NnxSharedNado, decode_model_for
from jaxdetox.sampling.decode import (
    DecodeModel,
    repeat_kv_cache,
    sample_loop,
)
from jaxdetox.sampling.sampler import (
    Sampler,
    bucket_length,
    left_pad,
    sample_batches,
    sample_prompts,
    to_host,
)
from jaxdetox.sampling.types import SampleOutput, SamplingConfig, StaticSpec, special_tokens
from jaxdetox.sampling.warpers import (
    apply_temperature,
    select_tokens,
    top_k_filter,
    top_p_filter,
    warp_logits,
)

__all__ = [
    "DecodeModel",
    "NnxLM",
    "NnxSharedNado",
    "SampleOutput",
    "Sampler",
    "SamplingConfig",
    "StaticSpec",
    "apply_temperature",
    "bucket_length",
    "decode_model_for",
    "left_pad",
    "repeat_kv_cache",
    "sample_batches",
    "sample_loop",
    "sample_prompts",
    "to_host",
    "select_tokens",
    "special_tokens",
    "top_k_filter",
    "top_p_filter",
    "warp_logits",
]
