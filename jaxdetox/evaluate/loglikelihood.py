"""Log-likelihood of continuations and of whole documents under a `LanguageModel`.

What lm-evaluation-harness asks of a model (`jaxdetox/evaluate/lm_eval_bridge.py` wraps it):

- `score_continuations(lm, [(context_ids, continuation_ids), ...])` -> `[(Σ log p(cont | ctx),
  is_greedy), ...]`; `is_greedy` says whether greedy decoding from the context would have
  produced exactly the continuation (argmax at every continuation position).
- `loglikelihood_rolling(lm, [doc_ids, ...], prefix_token=...)` -> `[Σ log p(doc), ...]`, each
  token predicted exactly once from windows of at most `max_length` tokens
  (`rolling_windows`: lm-eval's `get_rolling_token_windows` + `make_disjoint_window`).

A request longer than `max_length + 1` tokens is cut from the left (lm-eval's HF model does
the same). Requests are sorted by length, batched `batch_size` at a time and right-padded to
a bucket (input length rounded up to `length_multiple`, continuation length to
`continuation_multiple`), so one jitted program runs every batch of a bucket
(`Scorer.compile_count`). The program computes hidden states, gathers the continuation
positions only and projects them onto the vocabulary a chunk of positions at a time: no
`[B, T, V]` tensor, at most `[B, chunk, V]`. On a `LanguageModel` with a mesh the batch is
placed with `jaxdetox.sharding.batch_sharding`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdetox import sharding
from jaxdetox.losses.chunked import default_chunk_size, head_logits
from jaxdetox.losses.token import log_softmax

__all__ = [
    "Scorer",
    "encode_pair",
    "loglikelihood_rolling",
    "rolling_windows",
    "score_continuations",
]


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(max(n, 1) / multiple)) * multiple


def rolling_windows(
    tokens: Sequence[int], prefix_token: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """`(context, continuation)` windows that predict every token of `tokens` exactly once.

    The first window predicts the first `max_length` tokens from `prefix_token` (BOS/EOS);
    each later one predicts the next at most `max_length` tokens with the preceding tokens
    as context, so every window is `max_length` tokens long (the last keeps a full context).
    Same windows as lm-eval's `make_disjoint_window(get_rolling_token_windows(...,
    context_len=1))`.
    """
    if max_length < 1:
        raise ValueError(f"rolling_windows: max_length must be >= 1, got {max_length}")
    tokens = [int(t) for t in tokens]
    windows: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return windows
    first = min(max_length, len(tokens))
    windows.append(([int(prefix_token)], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_length)
        end = predicted + n
        windows.append((tokens[max(end - max_length - 1, 0) : predicted], tokens[predicted:end]))
        predicted = end
    return windows


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of `(context, continuation)` as lm-eval splits them for a causal LM.

    Trailing whitespace of the context moves to the continuation; the whole string is
    encoded (with the tokenizer's special tokens, e.g. BOS) and the continuation is what
    follows the context's own encoding, so merges across the boundary are scored as the
    model would see them. An empty context conditions on BOS (else EOS).
    """
    if not context:
        prefix = tokenizer.bos_token_id
        prefix = tokenizer.eos_token_id if prefix is None else prefix
        return [int(prefix)], list(tokenizer.encode(continuation, add_special_tokens=False))
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = list(tokenizer.encode(context + continuation))
    context_ids = list(tokenizer.encode(context))
    return context_ids, whole[len(context_ids) :]


class _Prepared(NamedTuple):
    inputs: list[int]  # model input (context + continuation minus its last token)
    targets: list[int]  # the continuation tokens scored (the last `len(targets)` predictions)


def _prepare(context: Sequence[int], continuation: Sequence[int], max_length: int) -> _Prepared:
    context, continuation = list(context), list(continuation)
    if not continuation:
        raise ValueError("loglikelihood: empty continuation (nothing to score)")
    if not context:
        raise ValueError(
            "loglikelihood: empty context; condition on a BOS/EOS token (lm-eval's prefix token)"
        )
    whole = (context + continuation)[-(max_length + 1) :]
    inputs = whole[:-1]
    n = min(len(continuation), len(inputs))
    return _Prepared([int(t) for t in inputs], [int(t) for t in continuation[-n:]])


def _score_batch(
    graphdef: nnx.GraphDef,
    steps: int,
    params: Any,
    tokens_bt: jax.Array,
    segment_ids_bt: jax.Array,
    start_b: jax.Array,
    targets_bc: jax.Array,
    mask_bc: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Σ log p(targets) and all-argmax per row, from the hidden states at positions
    `start_b + [0, C)` (the ones that predict the continuation), `steps` positions at a time."""
    model = nnx.merge(graphdef, params)
    h_btd, _ = model.hidden_states(tokens_bt, segment_ids_bt=segment_ids_bt)
    head = model.unembed_weights()
    b, t = tokens_bt.shape
    c = targets_bc.shape[1]
    index_bc = jnp.clip(start_b[:, None] + jnp.arange(c, dtype=jnp.int32)[None], 0, t - 1)
    h_bcd = jnp.take_along_axis(h_btd, index_bc[..., None], axis=1)
    n_chunks = c // steps

    def chunk(i: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = jax.lax.dynamic_slice_in_dim(h_bcd, i * steps, steps, axis=1)
        tgt = jax.lax.dynamic_slice_in_dim(targets_bc, i * steps, steps, axis=1)
        logits = head_logits(h, head)  # [B, steps, V] float32
        logp = jnp.take_along_axis(log_softmax(logits), tgt[..., None], axis=-1)[..., 0]
        return logp, jnp.argmax(logits, axis=-1) == tgt

    logp, greedy = jax.lax.map(chunk, jnp.arange(n_chunks))  # [n_chunks, B, steps]
    logp_bc = jnp.moveaxis(logp, 0, 1).reshape(b, c)
    greedy_bc = jnp.moveaxis(greedy, 0, 1).reshape(b, c)
    mask = mask_bc != 0
    return (
        jnp.sum(jnp.where(mask, logp_bc, 0.0), axis=1),
        jnp.all(jnp.where(mask, greedy_bc, True), axis=1),
    )


def _to_host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class Scorer:
    """Batched, bucketed, jitted log-likelihood scoring for one `LanguageModel`.

    `batch_size` rows per call (rounded up to a multiple of the mesh's data-parallel size),
    inputs right-padded to a multiple of `length_multiple` and continuations to a multiple of
    `continuation_multiple`; `max_length` (default: the config's `max_position_embeddings`)
    bounds the tokens a row sees. `chunk_size` is the number of positions (over the whole
    batch) projected onto the vocabulary at once (default `default_chunk_size(D)`).
    Executables are kept per `(T, C)` bucket; `compile_count` counts them.
    """

    def __init__(
        self,
        lm: Any,
        *,
        batch_size: int = 8,
        length_multiple: int = 32,
        continuation_multiple: int = 8,
        max_length: int | None = None,
        chunk_size: int | None = None,
    ) -> None:
        """Hold the model and bucketing options; nothing is compiled until the first batch."""
        if batch_size < 1 or length_multiple < 1 or continuation_multiple < 1:
            raise ValueError("Scorer: batch_size and the multiples must be >= 1")
        self.lm = lm
        self.mesh = getattr(lm, "mesh", None)
        data_parallel = 1
        if self.mesh is not None:
            data_parallel = int(
                np.prod([self.mesh.shape.get(a, 1) for a in ("data", "fsdp")], dtype=np.int64)
            )
        self.batch_size = _round_up(batch_size, data_parallel)
        self.length_multiple = length_multiple
        self.continuation_multiple = continuation_multiple
        self.max_length = int(max_length or lm.config.max_position_embeddings)
        self.chunk_size = chunk_size or default_chunk_size(lm.config.hidden_size)
        self._executables: dict[tuple, Any] = {}
        self.compile_count = 0
        self.compile_seconds = 0.0

    # ------------------------------------------------------------------ internals
    def _scope(self) -> contextlib.AbstractContextManager:
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _place(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, sharding.batch_sharding(self.mesh, x.shape))

    def _steps(self, c: int) -> int:
        """Positions per projection step: about `chunk_size` tokens over the batch, dividing C."""
        steps = max(1, min(c, self.chunk_size // self.batch_size))
        while c % steps:
            steps -= 1
        return steps

    def _run(self, graphdef: Any, params: Any, arrays: tuple[np.ndarray, ...]) -> Any:
        tokens_bt, _, _, targets_bc, _ = arrays
        key = (tokens_bt.shape, targets_bc.shape)
        args = (params, *(self._place(a) for a in arrays))
        executable = self._executables.get(key)
        if executable is None:
            begin = time.perf_counter()
            steps = self._steps(targets_bc.shape[1])

            def fn(params, *batch):  # noqa: ANN001, ANN202
                return _score_batch(graphdef, steps, params, *batch)

            with self._scope():
                executable = jax.jit(fn).lower(*args).compile()
            self._executables[key] = executable
            self.compile_count += 1
            self.compile_seconds += time.perf_counter() - begin
        return executable(*args)

    def _batch_arrays(self, rows: Sequence[_Prepared]) -> tuple[np.ndarray, ...]:
        b = self.batch_size
        t = min(
            _round_up(max(len(r.inputs) for r in rows), self.length_multiple),
            _round_up(self.max_length, self.length_multiple),
        )
        c = min(_round_up(max(len(r.targets) for r in rows), self.continuation_multiple), t)
        tokens = np.zeros((b, t), np.int32)
        segments = np.zeros((b, t), np.int32)
        start = np.zeros((b,), np.int32)
        targets = np.zeros((b, c), np.int32)
        mask = np.zeros((b, c), np.int32)
        for i, r in enumerate(rows):
            n_in, n_cont = len(r.inputs), len(r.targets)
            tokens[i, :n_in] = r.inputs
            segments[i, :n_in] = 1
            start[i] = n_in - n_cont
            targets[i, :n_cont] = r.targets
            mask[i, :n_cont] = 1
        return tokens, segments, start, targets, mask

    # ------------------------------------------------------------------ API
    def score(
        self,
        requests: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        progress: bool = False,
    ) -> list[tuple[float, bool]]:
        """`(Σ log p(continuation | context), is_greedy)` per `(context, continuation)` pair."""
        prepared = [_prepare(ctx, cont, self.max_length) for ctx, cont in requests]
        # Longest first (as lm-eval's collator): batches of similar length share a bucket.
        order = sorted(range(len(prepared)), key=lambda i: (-len(prepared[i].inputs), i))
        graphdef, params = self.lm.split()
        results: list[tuple[float, bool] | None] = [None] * len(prepared)
        starts = range(0, len(order), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="loglikelihood", unit="batch")
        for begin in starts:
            index = order[begin : begin + self.batch_size]
            arrays = self._batch_arrays([prepared[i] for i in index])
            logprob_b, greedy_b = self._run(graphdef, params, arrays)
            logprob_b, greedy_b = _to_host(logprob_b), _to_host(greedy_b)
            for row, i in enumerate(index):
                results[i] = (float(logprob_b[row]), bool(greedy_b[row]))
        return results  # type: ignore[return-value]

    def score_rolling(
        self, documents: Sequence[Sequence[int]], *, prefix_token: int, progress: bool = False
    ) -> list[float]:
        """Σ log p(document) per token list, from `rolling_windows` of `max_length` tokens."""
        windows, owner = [], []
        for d, doc in enumerate(documents):
            for window in rolling_windows(doc, prefix_token, self.max_length):
                windows.append(window)
                owner.append(d)
        totals = [0.0] * len(documents)
        for d, (logprob, _) in zip(owner, self.score(windows, progress=progress)):
            totals[d] += logprob
        return totals


def score_continuations(
    lm: Any,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    **options: Any,
) -> list[tuple[float, bool]]:
    """`(Σ log p(continuation | context), is_greedy)` per token-id pair (`Scorer` options)."""
    return Scorer(lm, **options).score(requests)


def loglikelihood_rolling(
    lm: Any, documents: Sequence[Sequence[int]], *, prefix_token: int, **options: Any
) -> list[float]:
    """Σ log p(document | prefix_token) per token-id list, in rolling windows (`Scorer`)."""
    return Scorer(lm, **options).score_rolling(documents, prefix_token=prefix_token)
