"""`LanguageModel`: model + config + tokenizer + mesh, what `load_pretrained` returns.

It sits above `jaxdetox.models` (the modules, HF/GGUF import and export) and
`jaxdetox.sampling` (which `generate` uses), so the model code never imports the sampler.
`random_init` makes one with random weights; `lm_sampler` gives the `Sampler` for an LM
(optionally NADO-guided), cached on the `LanguageModel`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxdetox import sharding
from jaxdetox.models import gguf, hf
from jaxdetox.models.config import ModelConfig
from jaxdetox.models.registry import build_model
from jaxdetox.sampling import Sampler, SamplingConfig, decode_model_for, special_tokens, to_host


def load_pretrained(
    path_or_hub_id: str | os.PathLike[str],
    *,
    mesh: Mesh | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    tokenizer: bool = True,
    revision: str | None = None,
) -> LanguageModel:
    """Load an HF checkpoint (local dir or hub id) into a `LanguageModel`, placed on `mesh`.

    A `.gguf` file (llama.cpp) or `"default"` (the built-in SmolLM2-135M-Instruct) goes
    through `jaxdetox.models.gguf.load_gguf`.
    """
    if gguf.is_gguf_source(path_or_hub_id):
        model, tok = gguf.load_gguf(
            path_or_hub_id, mesh=mesh, dtype=dtype, param_dtype=param_dtype, tokenizer=tokenizer
        )
        return LanguageModel(model.config, model, tokenizer=tok, mesh=mesh)
    directory = hf.resolve_checkpoint(path_or_hub_id, revision)
    ckpt = hf.SafetensorsCheckpoint(directory)
    model = hf.from_hf_tensors(
        hf.read_config(directory), ckpt.get, ckpt.names(),
        mesh=mesh, dtype=dtype, param_dtype=param_dtype, locate=ckpt.locate,
    )  # fmt: skip
    tok = None
    if tokenizer and any((directory / f).exists() for f in hf.TOKENIZER_FILES):
        from transformers import AutoTokenizer  # heavy; only when there is a tokenizer

        tok = AutoTokenizer.from_pretrained(str(directory))
    return LanguageModel(model.config, model, tokenizer=tok, mesh=mesh)


def random_init(
    config: ModelConfig, seed: int = 0, *, mesh: Mesh | None = None, tokenizer: Any = None
) -> LanguageModel:
    """A `LanguageModel` with random weights."""
    return LanguageModel(config, build_model(config, seed, mesh=mesh), tokenizer, mesh)


@functools.partial(jax.jit, static_argnums=0)
def logits_program(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens_bt: jax.Array,
    segment_ids_bt: jax.Array | None,
    positions_bt: jax.Array | None,
) -> jax.Array:
    """The model's logits `[B, T, V]`, one compiled program per model structure and shape."""
    logits_btv, _ = nnx.merge(graphdef, state)(
        tokens_bt, segment_ids_bt=segment_ids_bt, positions_bt=positions_bt
    )
    return logits_btv


class LanguageModel:
    """A causal LM ready to use: `logits`, `generate`, `save_pretrained`."""

    def __init__(
        self,
        config: ModelConfig,
        model: nnx.Module,
        tokenizer: Any = None,
        mesh: Mesh | None = None,
    ):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.mesh = mesh
        # (LM graph, NADO graph) -> Sampler, for `lm_sampler`: compiled sampling programs
        # live as long as the model they were compiled for.
        self._samplers: dict[tuple, Sampler] = {}

    def split(self) -> tuple[nnx.GraphDef, nnx.State]:
        """`(graphdef, params)` for pure functions: `nnx.merge(graphdef, params)` inside jit."""
        graphdef, params = nnx.split(self.model, nnx.Param)
        return graphdef, params

    def _place(self, x: Any) -> jax.Array | None:
        if x is None:
            return None
        x = jnp.asarray(x, jnp.int32)
        if self.mesh is not None:
            x = jax.device_put(x, sharding.batch_sharding(self.mesh, x.shape))
        return x

    def logits(
        self,
        tokens: np.ndarray | jax.Array,
        *,
        segment_ids: np.ndarray | jax.Array | None = None,
        positions: np.ndarray | jax.Array | None = None,
    ) -> jax.Array:
        """int32 tokens `[B, T]` -> float32 logits `[B, T, V]` (jit-compiled once per shape)."""
        tokens = np.asarray(tokens) if not isinstance(tokens, jax.Array) else tokens
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected shape [B, T], got {tuple(tokens.shape)}")
        graphdef, state = nnx.split(self.model)
        args = (self._place(tokens), self._place(segment_ids), self._place(positions))
        if self.mesh is None:
            return logits_program(graphdef, state, *args)
        with jax.set_mesh(self.mesh):
            return logits_program(graphdef, state, *args)

    def save_pretrained(self, out: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write an HF checkpoint dir loadable by transformers.AutoModelForCausalLM."""
        return hf.save_pretrained(self.model, out, tokenizer=self.tokenizer, **kwargs)

    def generate(
        self,
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
            raise ValueError(
                f"generate: tokens must be int [B, T] with T >= 1, got {tokens_bt.shape}"
            )
        eos_ids, pad = special_tokens(self.config)
        fields = {"eos_token_ids": eos_ids, "pad_token_id": pad, **options}  # options win
        config = SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            **fields,
        )
        sampler, params, _ = lm_sampler(self)
        out = sampler.sample(params, tokens_bt.astype(np.int32).tolist(), config)
        new_bn = to_host(out.tokens)  # whole array on every process of a multi-host mesh
        return jnp.asarray(np.concatenate([tokens_bt.astype(np.int32), new_bn], axis=1))

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"LanguageModel({cfg.model_type}, layers={cfg.num_layers}, d={cfg.hidden_size}, "
            f"vocab={cfg.vocab_size}, dtype={cfg.dtype}, mesh={dict(self.mesh.shape) if self.mesh else None})"
        )


def lm_sampler(lm: LanguageModel, nado: Any = None) -> tuple[Sampler, Any, Any]:
    """`(sampler, lm_params, nado_params)` for a `LanguageModel` (and optional NADO module).

    `nado`: a `NadoModel` (separate body with its own cache, or shared head on the LM's
    hidden states), or any module / `LanguageModel` whose logits serve as `h_φ`. The
    `Sampler` is cached on `lm`, so repeated calls reuse its compiled programs.
    """
    model, params = decode_model_for(lm.model)
    nado_model, nado_params = None, None
    if nado is not None:
        nado_model, nado_params = decode_model_for(getattr(nado, "model", nado))
    key = (model, nado_model)
    if key not in lm._samplers:
        lm._samplers[key] = Sampler(model, nado_model, mesh=lm.mesh)
    return lm._samplers[key], params, nado_params
