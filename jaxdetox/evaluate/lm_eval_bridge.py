"""The project's JAX model as an lm-evaluation-harness model, registered as `"jaxdetox"`.

`JaxdetoxLM(pretrained=PATH)` loads PATH with `jaxdetox.models.load_pretrained` (an HF
checkpoint dir, a `.gguf` file, `"default"`, a hub id) or, for a jaxdetox run directory, its
`final/model` (`resolve_model_path`). It tokenises like lm-eval's HF model (`HFLM`): the
tokenizer's own special tokens (BOS for Llama tokenizers) unless `add_bos_token` says
otherwise, context/continuation split by encoding the whole string, BOS (else EOS) as the
prefix of an empty context, so scores are comparable with `--model hf` on the same weights.

- `loglikelihood`: `jaxdetox.evaluate.loglikelihood.Scorer` (bucketed, jitted, no
  `[B, T, V]` logits).
- `loglikelihood_rolling`: lm-eval's rolling windows of `max_length` tokens, summed per
  document.
- `generate_until`: the project sampler (`jaxdetox.lm.lm_sampler`) in fixed-size
  batches, greedy unless the task asks for `do_sample`; EOS stops a row on the device, the
  task's stop strings are applied on the host to the decoded text (rows still run to
  `max_gen_toks` or EOS).

`run_lm_eval(model_path, tasks, ...)` runs `lm_eval.simple_evaluate` with this model;
`include_path` adds task YAMLs (e.g. a local multiple-choice task over a jsonl file with
`dataset_path: json` and `dataset_kwargs: {data_files: ...}`, which runs offline).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (registers lm-eval's own models before ours)
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm.auto import tqdm

from jaxdetox.evaluate.loglikelihood import Scorer, rolling_windows

__all__ = ["JaxdetoxLM", "resolve_model_path", "run_lm_eval"]

logger = logging.getLogger(__name__)


def resolve_model_path(path: str | os.PathLike[str]) -> str:
    """A jaxdetox run directory becomes its `final/model`; anything else is returned as is."""
    candidate = Path(path) / "final" / "model"
    if Path(path).is_dir() and candidate.is_dir():
        return str(candidate)
    return str(path)


def _mesh_from(spec: Any) -> Any:
    """None, a `jax.sharding.Mesh`, or a `data x fsdp x tensor` shape ('8x1x1', (-1, 1, 1))."""
    if spec is None or spec == "":
        return None
    from jax.sharding import Mesh

    if isinstance(spec, Mesh):
        return spec
    from jaxdetox.sharding import make_mesh

    if isinstance(spec, str):
        spec = tuple(int(x) for x in spec.replace(",", "x").split("x"))
    return make_mesh(tuple(spec))


@register_model("jaxdetox")
class JaxdetoxLM(TemplateLM):
    """lm-eval model backed by a `jaxdetox` `LanguageModel` (see the module docstring)."""

    def __init__(
        self,
        pretrained: str | os.PathLike[str] = "default",
        *,
        lm: Any = None,
        batch_size: int | str | None = 8,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        length_multiple: int | str = 32,
        add_bos_token: bool | str | None = None,
        dtype: str = "float32",
        mesh: Any = None,
        **unused: Any,
    ) -> None:
        """Load `pretrained` (or wrap the given `LanguageModel` `lm`); sizes may be strings."""
        super().__init__()
        unused = {k: v for k, v in unused.items() if v is not None}
        for key in ("device", "max_batch_size"):
            unused.pop(key, None)  # PyTorch-backend options lm-eval always passes
        if unused:
            logger.warning("jaxdetox lm-eval model: ignoring arguments %s", sorted(unused))
        if lm is None:
            from jaxdetox.models import load_pretrained

            path = resolve_model_path(pretrained)
            lm = load_pretrained(path, mesh=_mesh_from(mesh), dtype=dtype)
            self.model_path = path
        else:
            self.model_path = str(pretrained) if pretrained != "default" else repr(lm)
        if lm.tokenizer is None:
            raise ValueError(f"jaxdetox lm-eval model: {self.model_path} has no tokenizer")
        self.lm = lm
        self.tokenizer = lm.tokenizer
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 8
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or lm.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.length_multiple = int(length_multiple)
        if isinstance(add_bos_token, str):
            add_bos_token = add_bos_token.lower() in ("1", "true", "yes")
        self.add_bos_token = add_bos_token
        self.scorer = Scorer(
            lm,
            batch_size=self.batch_size,
            length_multiple=self.length_multiple,
            max_length=self._max_length,
        )

    # ---------------------------------------------------------------- tokenisation
    @property
    def eot_token_id(self) -> int:
        """The tokenizer's EOS id (ends generations; the prefix when there is no BOS)."""
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.lm.config.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context conditions on: BOS if the tokenizer has one, else EOS."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        """Most tokens one forward pass sees (longer requests are cut from the left)."""
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer for lm-eval's request caches."""
        return str(getattr(self.tokenizer, "name_or_path", "") or self.model_path).replace(
            "/", "__"
        )

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids as lm-eval's HF model makes them (no second BOS if the text has one)."""
        options = {}
        if add_special_tokens is not None:
            options["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            options["add_special_tokens"] = self.add_bos_token
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            options["add_special_tokens"] = False
        ids = list(self.tokenizer.encode(string, **options))
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (special tokens dropped by default, as lm-eval's HF model)."""
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- requests
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """Score tokenised `((context, continuation), context_ids, continuation_ids)`."""
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        results = self.scorer.score(pairs, progress=not disable_tqdm)
        for (strings, _, _), result in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Σ log p(text) per request, each token predicted once from `max_length` windows."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for window in rolling_windows(
                self.tok_encode(string), self.prefix_token_id, self.max_length
            ):
                windows.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.scorer.score(windows, progress=not disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string, EOS or `max_gen_toks` (greedy by default)."""
        from jaxdetox.lm import lm_sampler
        from jaxdetox.sampling import SamplingConfig, special_tokens

        eos_ids, pad = special_tokens(self.lm.config)
        eos_ids = tuple(dict.fromkeys((*eos_ids, self.eot_token_id)))
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        sampler, params, _ = lm_sampler(self.lm)
        params, _ = sampler.prepare(params)

        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[1]
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            max_ctx_len = self.max_length - max_gen_toks
            if max_ctx_len <= 0:
                raise ValueError(
                    f"generate_until: max_gen_toks={max_gen_toks} leaves no room for a context "
                    f"in max_length={self.max_length}"
                )
            sampled = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0)) > 0
            config = SamplingConfig(
                max_new_tokens=max_gen_toks,
                temperature=float(kwargs.get("temperature", 0.0)) if sampled else 0.0,
                top_k=int(kwargs.get("top_k", 0) or 0) if sampled else 0,
                top_p=float(kwargs.get("top_p", 1.0) or 1.0) if sampled else 1.0,
                eos_token_ids=eos_ids,
                pad_token_id=pad,
                prompt_bucket=self.length_multiple,
                seed=int(kwargs.get("seed", 0) or 0),
            )
            encoded = {
                i: self.tok_encode(requests[i].args[0], left_truncate_len=max_ctx_len)
                for i in indices
            }
            order = sorted(indices, key=lambda i: (-len(encoded[i]), i))
            for begin in range(0, len(order), self.batch_size):
                batch = order[begin : begin + self.batch_size]
                result = sampler.sample(
                    params, [encoded[i] for i in batch], config, batch_size=self.batch_size
                )
                tokens = np.asarray(result.tokens)
                lengths = np.asarray(result.lengths)
                for row, i in enumerate(batch):
                    text = self.tok_decode(tokens[row, : lengths[row]].tolist())
                    text = postprocess_generated_text(text, until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]


def run_lm_eval(
    model_path: str | os.PathLike[str] | Any,
    tasks: str | Sequence[str],
    *,
    num_fewshot: int | None = 0,
    limit: int | float | None = None,
    include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    include_defaults: bool = True,
    batch_size: int = 8,
    log_samples: bool = False,
    model_args: dict[str, Any] | None = None,
    **evaluate_kwargs: Any,
) -> dict:
    """`lm_eval.simple_evaluate` on the jaxdetox model at `model_path` (or a `LanguageModel`
    / `JaxdetoxLM`); returns lm-eval's results dict (`results`, `configs`, `samples`, ...).

    `include_path` adds directories of task YAMLs; `include_defaults=False` skips indexing
    lm-eval's built-in tasks (faster when only local tasks are run).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str):
        tasks = [tasks]
    if isinstance(model_path, JaxdetoxLM):
        model = model_path
    elif isinstance(model_path, str | os.PathLike):
        model = JaxdetoxLM(model_path, batch_size=batch_size, **(model_args or {}))
    else:  # a LanguageModel
        model = JaxdetoxLM(lm=model_path, batch_size=batch_size, **(model_args or {}))
    if include_path is not None and not isinstance(include_path, str | os.PathLike):
        include_path = [str(p) for p in include_path]
    elif include_path is not None:
        include_path = str(include_path)
    task_manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager,
        log_samples=log_samples,
        **evaluate_kwargs,
    )
    if results is None:  # not the main process of a distributed run
        return {}
    return dict(results)
