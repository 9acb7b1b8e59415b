"""`ModelConfig`: one frozen, hashable description of a causal LM, convertible to/from HF config.json.

`from_hf` accepts both the transformers v5 layout (`rope_parameters`) and the older v4 one
(`rope_theta` + `rope_scaling`), and rejects every field whose value would change the
maths in a way we do not implement, naming the field and the values we accept. Silently
ignoring such a field would give a model that loads but computes something else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jaxdetox.errors import JaxdetoxError

# HF model_type -> our family. Mistral is the Llama block plus an optional sliding window.
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "gpt2": "gpt2"}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
ROPE_TYPES = ("default", "linear", "llama3")
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu")
DTYPES = ("float32", "bfloat16", "float16")
# Attention kernels (jaxdetox/models/attention.py): auto = cuDNN on CUDA GPUs where it
# applies, the einsum reference on CPU, XLA's jax.nn.dot_product_attention elsewhere.
ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")
# Rematerialisation of each scanned block in the backward pass (models/layers.py, REMAT):
# none = keep every intermediate; dots_saveable = keep the matmul outputs, recompute the
# elementwise ops (norms, activations, softmax); full = keep only the block's input.
REMAT_POLICIES = ("none", "dots_saveable", "full")


class UnsupportedConfigError(JaxdetoxError, ValueError):
    """A config.json field has a value this implementation does not support."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture + dtype policy of a causal LM (hashable: usable as a jit static argument)."""

    family: str  # "llama" | "gpt2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    model_type: str = ""  # HF model_type written back by to_hf(); defaults to the family
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    norm_eps: float = 1e-6
    # RoPE (llama family only); rope_factor etc. only matter for the scaled types.
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int | None = None
    sliding_window: int | None = None  # Mistral: a query sees at most this many keys
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Runtime policy, not part of the HF architecture.
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations; logits are always float32
    # One of REMAT_POLICIES; a bool is accepted and stored as a name (True = full).
    remat: str = "none"
    attention: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS (jaxdetox/models/attention.py)

    def __post_init__(self) -> None:
        if not self.model_type:
            object.__setattr__(self, "model_type", self.family)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        _require(self.family in ("llama", "gpt2"), "family", self.family, "'llama' or 'gpt2'")
        _require(self.rope_type in ROPE_TYPES, "rope_type", self.rope_type, f"one of {ROPE_TYPES}")
        if isinstance(self.remat, bool):  # the former on/off switch
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        _require(self.remat in REMAT_POLICIES, "remat", self.remat, f"one of {REMAT_POLICIES}")
        _require(
            self.attention in ATTENTION_IMPLEMENTATIONS,
            "attention",
            self.attention,
            f"one of {ATTENTION_IMPLEMENTATIONS}",
        )
        for name in ("param_dtype", "dtype"):
            _require(getattr(self, name) in DTYPES, name, getattr(self, name), f"one of {DTYPES}")
        _require(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            self.num_kv_heads,
            f"a divisor of num_heads={self.num_heads}",
        )
        _require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "an even number (RoPE pairs)")

    @property
    def jnp_dtype(self) -> jnp.dtype:
        """Compute dtype as a jnp dtype."""
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        """Parameter storage dtype as a jnp dtype."""
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (e.g. dtype policy, num_layers for a NADO body)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF conversion

    @classmethod
    def from_hf(
        cls, hf: Mapping[str, Any], *, dtype: str = "float32", param_dtype: str = "float32"
    ) -> ModelConfig:
        """Build from an HF config.json dict; raises UnsupportedConfigError naming the field."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise UnsupportedConfigError(
                f"config.json: unknown model_type {model_type!r}; supported: {sorted(MODEL_TYPES)}"
            )
        if hf.get("quantization_config"):
            raise UnsupportedConfigError(
                "config.json: field 'quantization_config' is set; only unquantized checkpoints "
                "are supported (expected no quantization_config)"
            )
        common = dict(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            dtype=dtype,
            param_dtype=param_dtype,
        )
        if MODEL_TYPES[model_type] == "gpt2":
            return cls(family="gpt2", **_gpt2_fields(hf), **common)
        return cls(family="llama", **_llama_fields(hf, model_type), **common)

    def to_hf(self) -> dict[str, Any]:
        """The HF config.json dict (transformers v5 layout) describing this architecture."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": self.param_dtype,
        }
        if self.family == "gpt2":
            out.update(
                n_embd=self.hidden_size,
                n_layer=self.num_layers,
                n_head=self.num_heads,
                n_inner=self.intermediate_size,
                n_positions=self.max_position_embeddings,
                activation_function=self.hidden_act,
                layer_norm_epsilon=self.norm_eps,
            )
            return out
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
        out.update(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.norm_eps,
            rope_parameters=rope,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
        )
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        return out


def _require(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise UnsupportedConfigError(f"config field {field!r} = {value!r}; expected {expected}")


def _reject_if(hf: Mapping[str, Any], field: str, bad: bool, expected: str) -> None:
    if bad:
        raise UnsupportedConfigError(
            f"config.json: unsupported value for field {field!r}: {hf.get(field)!r}; "
            f"expected {expected}"
        )


def _gpt2_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    _reject_if(hf, "activation_function", act not in GPT2_ACTIVATIONS, f"one of {GPT2_ACTIVATIONS}")
    _reject_if(hf, "scale_attn_weights", not hf.get("scale_attn_weights", True), "true")
    _reject_if(
        hf,
        "scale_attn_by_inverse_layer_idx",
        bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
        "false",
    )
    _reject_if(hf, "add_cross_attention", bool(hf.get("add_cross_attention", False)), "false")
    d = int(hf.get("n_embd", 768))
    heads = int(hf.get("n_head", 12))
    return dict(
        hidden_size=d,
        num_layers=int(hf.get("n_layer", 12)),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        intermediate_size=int(hf.get("n_inner") or 4 * d),
        max_position_embeddings=int(hf.get("n_positions", 1024)),
        hidden_act=act,
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=True,
        mlp_bias=True,
    )


def _rope_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    # v5 keeps everything in `rope_parameters`; v4 has `rope_theta` and optional `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    field = "rope_parameters"
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        field = "rope_scaling"
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedConfigError(
            f"config.json: unsupported {field}.rope_type {rope_type!r}; expected one of {ROPE_TYPES}"
        )
    prf = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1.0):
        raise UnsupportedConfigError(
            f"config.json: unsupported partial_rotary_factor {prf!r}; expected 1.0"
        )
    att = params.get("attention_factor")
    if att not in (None, 1.0):
        raise UnsupportedConfigError(
            f"config.json: unsupported {field}.attention_factor {att!r}; expected 1.0 or absent"
        )
    out: dict[str, Any] = {"rope_type": rope_type, "rope_theta": float(params["rope_theta"])}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        out["rope_original_max_position_embeddings"] = int(
            params.get("original_max_position_embeddings") or hf["max_position_embeddings"]
        )
    return out


def _llama_fields(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    act = hf.get("hidden_act", "silu")
    _reject_if(hf, "hidden_act", act != "silu", "'silu' (SwiGLU)")
    for field in ("attn_logit_softcapping", "final_logit_softcapping", "num_local_experts"):
        _reject_if(hf, field, hf.get(field) is not None, "null/absent")
    _reject_if(hf, "use_sliding_window", bool(hf.get("use_sliding_window", False)), "false")
    layer_types = hf.get("layer_types")
    _reject_if(
        hf,
        "layer_types",
        bool(layer_types) and any(t != "full_attention" for t in layer_types),
        "only 'full_attention' layers",
    )
    window = hf.get("sliding_window")
    _reject_if(
        hf, "sliding_window", window is not None and model_type != "mistral", "null for llama"
    )
    heads = int(hf["num_attention_heads"])
    d = int(hf["hidden_size"])
    return dict(
        hidden_size=d,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or d // heads),
        intermediate_size=int(hf["intermediate_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        hidden_act=act,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        sliding_window=None if window is None else int(window),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        **_rope_fields(hf),
    )
