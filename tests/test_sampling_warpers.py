"""Logits warpers vs transformers' Temperature/TopK/TopP warpers on fixed logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jaxdetox.sampling import select_tokens, top_k_filter, top_p_filter, warp_logits


def _logits(batch=6, vocab=97, seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(size=(batch, vocab)).astype(np.float32) * scale


def _hf(warpers, logits):
    scores = torch.from_numpy(logits.copy())
    for w in warpers:
        scores = w(None, scores)
    return scores.numpy()


def _assert_same(ours, ref):
    ours = np.asarray(ours)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    keep = ~np.isneginf(ref)
    np.testing.assert_allclose(ours[keep], ref[keep], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 40, 97, 200])
def test_top_k_matches_transformers(k):
    logits = _logits()
    _assert_same(top_k_filter(jnp.asarray(logits), k), _hf([TopKLogitsWarper(k)], logits))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.62, 0.9, 0.999])
def test_top_p_matches_transformers(p):
    logits = _logits(seed=1)
    _assert_same(top_p_filter(jnp.asarray(logits), p), _hf([TopPLogitsWarper(p)], logits))


@pytest.mark.parametrize(
    "temperature,k,p",
    [(0.7, 0, 1.0), (1.3, 10, 1.0), (0.5, 0, 0.8), (2.0, 20, 0.7), (1.0, 3, 0.95)],
)
def test_chained_warpers_match_transformers(temperature, k, p):
    logits = _logits(seed=2, batch=8, vocab=257)
    ref_warpers = [TemperatureLogitsWarper(temperature)]
    ref_warpers += [TopKLogitsWarper(k)] if k else []
    ref_warpers += [TopPLogitsWarper(p)] if p < 1 else []
    ours = warp_logits(jnp.asarray(logits), temperature=temperature, top_k=k, top_p=p)
    _assert_same(ours, _hf(ref_warpers, logits))


def test_warpers_traced_values_under_jit():
    """temperature and top_p are runtime values: one compile serves all of them."""
    logits = _logits(seed=3)
    traces = []

    @jax.jit
    def warped(logits, t, p):
        traces.append(1)
        return warp_logits(logits, temperature=t, top_k=7, top_p=p, use_top_p=True)

    for t, p in [(0.8, 0.5), (1.5, 0.9)]:
        ref = _hf([TemperatureLogitsWarper(t), TopKLogitsWarper(7), TopPLogitsWarper(p)], logits)
        _assert_same(warped(jnp.asarray(logits), t, p), ref)
    assert len(traces) == 1


def test_top_p_keeps_at_least_one_token():
    logits = np.array([[10.0, 0.0, -1.0, -2.0]], np.float32)  # top token has ~0.9999
    out = np.asarray(top_p_filter(jnp.asarray(logits), 0.01))
    assert np.isfinite(out[0, 0]) and np.isneginf(out[0, 1:]).all()


def test_select_tokens_greedy_and_per_row_keys():
    logits = jnp.asarray(_logits(seed=4))
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(0), jnp.arange(6))
    np.testing.assert_array_equal(
        select_tokens(keys, logits, greedy=True), np.argmax(np.asarray(logits), -1)
    )
    a = select_tokens(keys, logits, greedy=False)
    # A row's draw depends on its own key only, not on the other rows in the batch.
    b = select_tokens(keys[2:4], logits[2:4], greedy=False)
    np.testing.assert_array_equal(np.asarray(a)[2:4], b)


def test_bisection_nucleus_equals_sorted_nucleus_with_ties_and_masked_entries():
    """The sort-free top-p (bisection) and the sorted top-k path agree, ties included."""
    rng = np.random.default_rng(5)
    logits = np.round(rng.normal(size=(16, 200)) * 2, 1).astype(np.float32)  # many ties
    logits[:, :20] = -np.inf  # already-masked entries
    for p in (0.1, 0.5, 0.9, 0.99):
        bisect = top_p_filter(jnp.asarray(logits), p)
        # top_k = V - 20 keeps every finite entry, so this runs the sorted nucleus.
        sorted_path = warp_logits(jnp.asarray(logits), top_k=180, top_p=p)
        np.testing.assert_array_equal(np.asarray(bisect), np.asarray(sorted_path))


def test_kth_largest_exact_on_hard_rows():
    """Ties, +-inf, signed zeros, constant rows and wide scales: exactly np.sort's k-th."""
    from jaxdetox.sampling.warpers import kth_largest

    rng = np.random.default_rng(7)
    rows = [
        rng.normal(size=64) * 1e-30,
        rng.normal(size=64) * 1e30,
        np.round(rng.normal(size=64)),  # many ties
        np.full(64, 2.5),
        np.where(rng.random(64) < 0.5, -np.inf, rng.normal(size=64)),
        np.concatenate([[np.inf, np.inf], rng.normal(size=62)]),
        np.array([0.0, -0.0] * 32),
        np.concatenate([[3.0], np.full(63, -np.inf)]),
    ]
    x = np.stack(rows).astype(np.float32)
    for k in (1, 2, 3, 17, 63, 64):
        ref = -np.sort(-x, axis=-1)[:, k - 1 : k]
        np.testing.assert_array_equal(np.asarray(kth_largest(jnp.asarray(x), k)), ref)


def test_top_k_on_a_real_vocabulary_matches_transformers():
    logits = _logits(batch=4, vocab=50257, seed=5)
    for k in (1, 50, 640):
        _assert_same(top_k_filter(jnp.asarray(logits), k), _hf([TopKLogitsWarper(k)], logits))
