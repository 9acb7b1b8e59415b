"""Exact enumeration over every sequence of a tiny vocabulary, for testing the losses.

A tiny autoregressive LM is a table of next-token logits per prefix: `logits[t]` has shape
`(V,)*t + (V,)` and holds the logits of p(·| y_1..y_t). An oracle is an array `C` of shape
`(V,)*T` in [0, 1]. Everything is numpy float64 so exactness checks are not limited by fp32.

"Aligned" arrays follow jaxdetox.losses' convention: position t (0-based) of a `[N, T, V]`
array is the output after reading the prefix y_1..y_t (t tokens), and `targets[:, t]` is
the token that follows it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TinyLM:
    """Random table LM: `logits[t][y_1..y_t]` = next-token logits after a t-token prefix."""

    vocab: int
    length: int
    logits: tuple[np.ndarray, ...]

    def log_probs(self) -> list[np.ndarray]:
        """log p(v | prefix) per prefix length t, shapes (V,)*t + (V,)."""
        return [lg - np.logaddexp.reduce(lg, axis=-1, keepdims=True) for lg in self.logits]

    def sequence_log_probs(self) -> np.ndarray:
        """log p(y) for every full sequence, shape (V,)*T."""
        v = self.vocab
        total = np.zeros(())
        for t, lp in enumerate(self.log_probs()):
            # broadcast the running sum over the new token axis
            total = total[..., None] + lp.reshape((v,) * t + (v,))
        return total


def random_lm(rng: np.random.Generator, vocab: int, length: int, scale: float = 1.5) -> TinyLM:
    """A random TinyLM with N(0, scale²) logits (peaked enough that probabilities differ)."""
    logits = tuple(rng.normal(0.0, scale, size=(vocab,) * t + (vocab,)) for t in range(length))
    return TinyLM(vocab, length, logits)


def random_oracle(rng: np.random.Generator, vocab: int, length: int, hard: bool) -> np.ndarray:
    """A random C over all sequences: uniform in [0.05, 0.95] (soft) or {0, 1} (hard, both present)."""
    shape = (vocab,) * length
    if not hard:
        return rng.uniform(0.05, 0.95, size=shape)
    c = (rng.uniform(size=shape) < 0.5).astype(np.float64)
    c.flat[0], c.flat[-1] = 1.0, 0.0
    return c


def success_rates(lm: TinyLM, oracle: np.ndarray) -> list[np.ndarray]:
    """Exact R(x, y_≤t) for t = 0..T by backward recursion; R[0] = R(x), R[T] = C."""
    rates = [None] * (lm.length + 1)
    rates[lm.length] = np.asarray(oracle, dtype=np.float64)
    log_probs = lm.log_probs()
    for t in range(lm.length - 1, -1, -1):
        rates[t] = np.sum(np.exp(log_probs[t]) * rates[t + 1], axis=-1)
    return rates


def exact_nado_logits(rates: list[np.ndarray]) -> list[np.ndarray]:
    """logit R(x, y_≤t ∘ v) per prefix length t (±inf where R is 0 or 1), shapes (V,)*t+(V,)."""
    out = []
    for r in rates[1:]:
        # Sums of p·1 round to 1 ± 1e-16; snap them so a hard oracle's certain prefixes get
        # logits ±inf exactly (otherwise r = 1 − 1e-16 against s = 1 is a spurious infinite KL).
        r = np.where(np.abs(r - 1.0) < 1e-12, 1.0, np.where(r < 1e-12, 0.0, r))
        with np.errstate(divide="ignore"):
            out.append(np.log(r) - np.log1p(-r))
    return out


def all_sequences(vocab: int, length: int) -> np.ndarray:
    """Every sequence in C order of the (V,)*T tables, int32 [V**T, T]."""
    return np.array(list(itertools.product(range(vocab), repeat=length)), dtype=np.int32)


def aligned(tables: list, seqs: np.ndarray, xp=np):  # noqa: ANN001
    """Stack `tables[t][y_1..y_t]` over t → [N, T, V] (next-token aligned); xp = np or jnp."""
    n, v = len(seqs), tables[0].shape[-1]
    rows = [xp.broadcast_to(tables[t][tuple(seqs[:, :t].T)], (n, v)) for t in range(seqs.shape[1])]
    return xp.stack(rows, axis=1)


def prefix_counts(
    seqs: np.ndarray, vocab: int, weights: np.ndarray | None = None
) -> list[np.ndarray]:
    """Weighted counts of each prefix y_1..y_t+1 among `seqs`, shapes (V,)*(t+1), t = 0..T-1."""
    w = np.ones(len(seqs)) if weights is None else weights
    out = []
    for t in range(seqs.shape[1]):
        c = np.zeros((vocab,) * (t + 1))
        np.add.at(c, tuple(seqs[:, : t + 1].T), w)
        out.append(c)
    return out


def sample_sequences(rng: np.random.Generator, log_weights: np.ndarray, n: int) -> np.ndarray:
    """n i.i.d. sequences from the distribution ∝ exp(log_weights) over the (V,)*T table."""
    v, t = log_weights.shape[0], log_weights.ndim
    p = np.exp(log_weights.ravel() - np.logaddexp.reduce(log_weights.ravel()))
    idx = rng.choice(p.size, size=n, p=p / p.sum())
    return np.stack(np.unravel_index(idx, (v,) * t), axis=1).astype(np.int32)


# ----------------------------------------------------------------------------- stopping LMs
# A real LM's completion stops at EOS, so its completions have 1..T tokens. With the rows after
# an EOS made a point mass on EOS (`stopping_lm`), every completion is exactly one (V,)*T
# sequence (the completion padded with EOS) of the same probability, and everything above
# (success_rates, sequence_log_probs, sums over the (V,)*T table) applies unchanged.


def ended(vocab: int, t: int, eos: int) -> np.ndarray:
    """bool (V,)*t: whether the prefix y_1..y_t contains `eos` (its completion has stopped)."""
    if t == 0:
        return np.zeros((), bool)
    return np.any(np.indices((vocab,) * t) == eos, axis=0)


def stopping_lm(tables: list[np.ndarray], eos: int) -> TinyLM:
    """A TinyLM from next-token logit tables (shapes (V,)*t + (V,), t < T) whose rows after an
    `eos` are replaced by a point mass on `eos`."""
    vocab, out = tables[0].shape[-1], []
    stop = np.full(vocab, -np.inf)
    stop[eos] = 0.0
    for t, table in enumerate(tables):
        table = np.array(table, np.float64)
        table[ended(vocab, t, eos)] = stop
        out.append(table)
    return TinyLM(vocab, len(tables), tuple(out))


def completions(seqs: np.ndarray, eos: int) -> list[np.ndarray]:
    """Each sequence up to and including its first `eos` (the completion it pads)."""
    cut = [int(np.argmax(s == eos)) + 1 if np.any(s == eos) else len(s) for s in seqs]
    return [s[:n] for s, n in zip(seqs, cut)]


def prefix_probs(lm: TinyLM) -> list[np.ndarray]:
    """p(y_1..y_t) for t = 0..T-1, shapes (V,)*t."""
    out, p = [], np.ones(())
    for lp in lm.log_probs():
        out.append(p)
        p = p[..., None] * np.exp(lp)
    return out


def continuation_tables(fn, prompt: np.ndarray, vocab: int, length: int) -> list[np.ndarray]:  # noqa: ANN001
    """A model's teacher-forced outputs as tables: `fn(tokens [N, P+T-1]) -> [N, P+T-1, V]`
    is run once on `prompt` followed by every (V,)^(T-1) sequence; table t (shape
    (V,)*t + (V,)) is the output after prompt∘y_1..y_t, t = 0..T-1."""
    seqs = all_sequences(vocab, length - 1)
    tokens = np.concatenate([np.tile(np.asarray(prompt, np.int32), (len(seqs), 1)), seqs], 1)
    out = np.asarray(fn(tokens), np.float64)[:, len(prompt) - 1 :]
    out = out.reshape((vocab,) * (length - 1) + out.shape[1:])
    # y_1..y_t leads the C-order index: any continuation of it (take y_>t = 0) gives its row
    return [out[(slice(None),) * t + (0,) * (length - 1 - t) + (t,)] for t in range(length)]


def rate_error(
    lm: TinyLM, rates: list[np.ndarray], nado_logits: list[np.ndarray], eos: int, every: bool
) -> float:
    """Mean |σ(h(y_≤t)[v]) − R(y_≤t∘v)| over the next tokens v of the unfinished prefixes
    y_≤t, weighted by p(y_≤t)·p(v|y_≤t) (the tokens a sample from p visits: what the BCE
    trains), or with `every` by p(y_≤t)/|V| (all next tokens: what the guided teacher reads)."""
    num = den = 0.0
    for t, (w, lp) in enumerate(zip(prefix_probs(lm), lm.log_probs())):
        w = np.where(ended(lm.vocab, t, eos), 0.0, w)[..., None]
        w = w * (np.ones(lm.vocab) / lm.vocab if every else np.exp(lp))
        err = np.abs(1.0 / (1.0 + np.exp(-nado_logits[t])) - rates[t + 1])
        num, den = num + np.sum(w * err), den + np.sum(w)
    return float(num / den)
