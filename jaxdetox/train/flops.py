"""Analytic FLOP counts of the train steps and an MFU estimate.

Counts are matmul FLOPs (2 per multiply-add), the convention of PaLM's MFU: per token, a
decoder layer costs 2·(its weight count) for the projections plus 4·T_ctx·D for attention
scores and the weighted sum (causal: half of a full `T × T`), and the vocabulary head
2·D·V. A backward pass costs twice its forward. In the regularised LLM step the student
runs forward + backward (3×), while the reference LLM and the NADO body run forward only
(1×) and the two teacher heads (reference, NADO) add one head each per KL token.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from jaxdetox.models.config import ModelConfig


def layer_weights(config: ModelConfig) -> int:
    """Weights of one decoder layer that take part in matmuls (norms and biases excluded)."""
    d, h = config.hidden_size, config.head_dim
    attn = d * h * (config.num_heads * 2 + config.num_kv_heads * 2)
    mlp_mats = 3 if config.family == "llama" else 2
    return attn + mlp_mats * d * config.intermediate_size


def body_forward_flops(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the layer stack (no head) at context length `seq_len`."""
    per_layer = 2 * layer_weights(config) + 2 * config.num_heads * config.head_dim * seq_len
    return float(config.num_layers * per_layer)


def head_flops(config: ModelConfig) -> float:
    """Forward FLOPs per token of one vocabulary head `[D] x [D, V]`."""
    return float(2 * config.hidden_size * config.vocab_size)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one step by part (for MFU and for the benchmark's sum-of-parts check)."""

    lm: float = 0.0  # student forward + backward
    reference: float = 0.0  # frozen reference forward (+ its head on KL tokens)
    nado: float = 0.0  # NADO body / head, forward (+ backward when trained)

    @property
    def total(self) -> float:
        """All parts together."""
        return self.lm + self.reference + self.nado


def lm_step_flops(
    lm: ModelConfig,
    nado_body: ModelConfig | None,
    *,
    tokens: int,
    kl_tokens: int,
    seq_len: int,
    nado_trained: bool = False,
) -> StepFlops:
    """FLOPs of an LLM step on `tokens` tokens of which `kl_tokens` get the KL term.

    `nado_body`: the separate NADO's body config (None for the shared variant: head only).
    `nado_trained`: the joint step (the NADO also runs backward).
    """
    lm_part = 3 * tokens * (body_forward_flops(lm, seq_len) + head_flops(lm))
    ref_part = kl_tokens * (body_forward_flops(lm, seq_len) + head_flops(lm))
    nado_mult = 3 if nado_trained else 1
    nado_body_flops = 0.0 if nado_body is None else body_forward_flops(nado_body, seq_len)
    nado_part = kl_tokens * nado_mult * (nado_body_flops + head_flops(lm))
    return StepFlops(lm=lm_part, reference=ref_part, nado=nado_part)


def nado_step_flops(
    lm: ModelConfig,
    nado_body: ModelConfig | None,
    *,
    tokens: int,
    seq_len: int,
    consistency: bool,
) -> StepFlops:
    """FLOPs of a NADO step: body forward + backward; the BCE gathers rows (no full head)
    unless the consistency term needs the reference and the full NADO head."""
    nado_body_flops = 0.0 if nado_body is None else body_forward_flops(nado_body, seq_len)
    nado_part = 3 * tokens * nado_body_flops
    ref_part = 0.0
    if consistency or nado_body is None:  # the shared variant reads the reference's states
        ref_part = tokens * body_forward_flops(lm, seq_len)
    if consistency:
        nado_part += 3 * tokens * head_flops(lm)
        ref_part += tokens * head_flops(lm)
    return StepFlops(reference=ref_part, nado=nado_part)


# Peak dense FLOP/s per chip (bf16 unless noted), from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


@functools.cache
def measured_matmul_peak(size: int = 1024, repeats: int = 5) -> float:
    """Best-of fp32 matmul FLOP/s of the default device (CPU: what the cores deliver)."""
    x = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_peak_flops(device: jax.Device | None = None) -> tuple[float, str]:
    """`(peak FLOP/s of one device, where the figure comes from)`."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_FLOPS.items():
        if kind.startswith(name):
            return peak, f"datasheet ({kind})"
    return measured_matmul_peak(), f"measured fp32 matmul ({kind or device.platform})"
