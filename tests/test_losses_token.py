"""Token-level losses: guided teacher, closed-form KL, soft CE, NLL; stability at extremes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdetox import losses


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def np_kl(t, s):
    """KL(softmax t ‖ softmax s) in float64 numpy, 0·log 0 = 0."""
    lq, lp = np_log_softmax(t), np_log_softmax(s)
    q = np.exp(lq)
    with np.errstate(invalid="ignore"):
        terms = np.where(q > 0, q * (lq - lp), 0.0)
    return terms.sum(-1)


def all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return rng.normal(0, 3, size=(2, 4, 7)), rng.normal(0, 3, size=(2, 4, 7))


def test_token_kl_matches_numpy_float64(logits):
    t, s = logits
    with jax.enable_x64(True):
        kl = losses.token_kl(jnp.asarray(t), jnp.asarray(s))
        assert kl.dtype == jnp.float64 and kl.shape == (2, 4)
        np.testing.assert_allclose(kl, np_kl(t, s), rtol=1e-12, atol=1e-14)
    # float32 path, and bf16 inputs are upcast (output float32)
    kl32 = losses.token_kl(jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32))
    assert kl32.dtype == jnp.float32
    np.testing.assert_allclose(kl32, np_kl(t, s), rtol=1e-5, atol=1e-6)
    assert losses.token_kl(jnp.asarray(t, jnp.bfloat16), jnp.asarray(s, jnp.bfloat16)).dtype == (
        jnp.float32
    )


def test_token_kl_zero_on_equal_and_shift_invariant(logits):
    t, _ = logits
    t = jnp.asarray(t, jnp.float32)
    np.testing.assert_allclose(losses.token_kl(t, t + 5.0), 0.0, atol=1e-6)


def test_token_kl_grad_is_softmax_difference(logits):
    t, s = logits
    t[0, 1, 2] = -np.inf  # a masked-vocabulary teacher entry
    t[1, 0, :3] = -np.inf
    with jax.enable_x64(True):
        g = jax.grad(lambda s_: losses.token_kl(jnp.asarray(t), s_).sum())(jnp.asarray(s))
        expect = np.exp(np_log_softmax(s)) - np.exp(np_log_softmax(t))
        np.testing.assert_allclose(g, expect, atol=1e-12)


def test_token_kl_teacher_minus_inf_entries():
    t = jnp.array([[0.0, -jnp.inf, 1.0, -jnp.inf], [-jnp.inf] * 3 + [2.0]])
    s = jnp.array([[0.5, 3.0, -1.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    kl = losses.token_kl(t, s)
    np.testing.assert_allclose(kl, np_kl(np.asarray(t), np.asarray(s)), rtol=1e-5)
    # a one-hot teacher: KL = −log p(v)
    np.testing.assert_allclose(kl[1], -np_log_softmax(np.asarray(s[1]))[3], rtol=1e-5)
    grads = jax.grad(lambda a, b: losses.token_kl(a, b).sum(), argnums=(0, 1))(t, s)
    assert all_finite(grads)
    # student also -inf where the teacher is -inf: still finite, still 0·log 0 = 0
    s2 = jnp.where(jnp.isinf(t), -jnp.inf, s)
    kl2 = losses.token_kl(t, s2)
    assert all_finite(kl2)
    g2 = jax.grad(lambda a, b: losses.token_kl(a, b).sum(), argnums=(0, 1))(t, s2)
    assert not any(bool(jnp.any(jnp.isnan(x))) for x in g2)


def test_token_kl_fully_masked_row_is_zero_without_nan():
    t = jnp.array([[-jnp.inf] * 3, [0.0, 1.0, 2.0]])
    s = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    kl = losses.token_kl(t, s)
    assert kl[0] == 0.0 and jnp.isfinite(kl[1])
    assert all_finite(jax.grad(lambda a, b: losses.token_kl(a, b).sum(), argnums=(0, 1))(t, s))


@pytest.mark.parametrize("big", [1e4, 1e30, 1.5e38])
def test_token_kl_extreme_logits(big):
    # ±big in one row: log-probs down to −2·big, still representable in float32 up to ~1.7e38
    # (beyond that the true KL itself overflows float32).
    big = big if big < 1e38 else big / 2
    t = jnp.array([[big, -big, 0.0, 1.0], [-big, -big, big, big]], jnp.float32)
    s = jnp.array([[-big, big, 0.0, 2.0], [big, 0.0, -big, 1.0]], jnp.float32)
    kl, grads = jax.value_and_grad(lambda a, b: losses.token_kl(a, b).sum(), argnums=(0, 1))(t, s)
    assert all_finite((kl, grads))
    # student gradient: softmax(s) − softmax(t), all entries in [−1, 1]
    expect = np.exp(np_log_softmax(np.asarray(s))) - np.exp(np_log_softmax(np.asarray(t)))
    np.testing.assert_allclose(grads[1], expect, atol=1e-6)
    np.testing.assert_allclose(losses.token_kl(t, t), 0.0, atol=1e-6)


def test_token_kl_near_float32_max():
    # Logits at the top of the float32 range but with representable differences.
    t = jnp.array([[3.0e38, 3.0e38 - 1e32, 2.9e38]], jnp.float32)
    s = jnp.array([[3.0e38 - 1e32, 3.0e38, 2.9e38]], jnp.float32)
    kl, grads = jax.value_and_grad(lambda a, b: losses.token_kl(a, b).sum(), argnums=(0, 1))(t, s)
    assert all_finite((kl, grads))
    # q ≈ one-hot on token 0, so KL ≈ −log p(0) = t0 − s0 (as rounded to float32)
    np.testing.assert_allclose(kl, float(t[0, 0]) - float(s[0, 0]), rtol=1e-5)
    np.testing.assert_allclose(grads[1], [[-1.0, 1.0, 0.0]], atol=1e-6)


def test_guided_log_probs_formula_and_normalisation(logits):
    base, nado = logits
    with jax.enable_x64(True):
        lq = losses.guided_log_probs(jnp.asarray(base), jnp.asarray(nado), alpha=0.7)
        log_sig = -np.logaddexp(0.0, -nado)
        expect = np_log_softmax(np_log_softmax(base) + 0.7 * log_sig)
        np.testing.assert_allclose(lq, expect, atol=1e-12)
        np.testing.assert_allclose(np.exp(lq).sum(-1), 1.0, atol=1e-12)
        # alpha = 0: the base distribution itself
        np.testing.assert_allclose(
            losses.guided_log_probs(jnp.asarray(base), jnp.asarray(nado), 0.0),
            np_log_softmax(base),
            atol=1e-12,
        )


def test_guided_log_probs_infinite_and_extreme_nado():
    base = jnp.array([[0.0, 1.0, -jnp.inf, 2.0]])
    nado = jnp.array([[-jnp.inf, jnp.inf, 0.0, 1e30]])  # R = 0, 1, 0.5, 1
    lq = losses.guided_log_probs(base, nado)
    assert lq[0, 0] == -jnp.inf and lq[0, 2] == -jnp.inf
    np.testing.assert_allclose(np.exp(lq).sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(lq[0, 1], np_log_softmax(np.array([1.0, 2.0]))[0], rtol=1e-6)
    # every next token impossible under R: a fully -inf row, not NaN
    dead = losses.guided_log_probs(jnp.zeros((1, 3)), jnp.full((1, 3), -jnp.inf))
    assert bool(jnp.all(dead == -jnp.inf))
    g = jax.grad(lambda b, h: losses.token_kl(losses.guided_log_probs(b, h), b).sum(), (0, 1))(
        jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[-1e30, 0.0, 1e30]])
    )
    assert all_finite(g)


def test_soft_cross_entropy_is_kl_plus_entropy(logits):
    t, s = logits
    with jax.enable_x64(True):
        ce = losses.soft_cross_entropy(jnp.asarray(t), jnp.asarray(s))
        lq = np_log_softmax(t)
        entropy = -(np.exp(lq) * lq).sum(-1)
        np.testing.assert_allclose(ce, np_kl(t, s) + entropy, atol=1e-12)
        g_ce = jax.grad(lambda x: losses.soft_cross_entropy(jnp.asarray(t), x).sum())(
            jnp.asarray(s)
        )
        g_kl = jax.grad(lambda x: losses.token_kl(jnp.asarray(t), x).sum())(jnp.asarray(s))
        np.testing.assert_allclose(g_ce, g_kl, atol=1e-12)
    t2 = jnp.array([[0.0, -jnp.inf, 1.0]])
    assert all_finite(losses.soft_cross_entropy(t2, jnp.array([[1.0, -jnp.inf, 0.0]])))


def test_token_nll_with_mask_and_padding_ids(logits):
    _, s = logits
    targets = np.array([[0, 6, 3, -100], [2, 2, -100, -100]])
    mask = targets >= 0
    nll = losses.token_nll(jnp.asarray(s, jnp.float32), jnp.asarray(targets), jnp.asarray(mask))
    lp = np_log_softmax(s)
    expect = np.where(
        mask, -np.take_along_axis(lp, np.maximum(targets, 0)[..., None], -1)[..., 0], 0
    )
    np.testing.assert_allclose(nll, expect, rtol=1e-5)
    # one-hot-target NLL == soft CE against a one-hot teacher
    onehot = jnp.where(jax.nn.one_hot(np.maximum(targets, 0), 7) > 0, 0.0, -jnp.inf)
    ce = losses.soft_cross_entropy(onehot, jnp.asarray(s, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(ce, nll, rtol=1e-5)


def test_token_nll_extreme_logits():
    s = jnp.array([[1e30, -1e30, 0.0], [-jnp.inf, 0.0, 1.0]], jnp.float32)
    v, g = jax.value_and_grad(lambda x: losses.token_nll(x, jnp.array([0, 2])).sum())(s)
    assert all_finite((v, g))
    np.testing.assert_allclose(v, -np_log_softmax(np.array([0.0, 1.0]))[1], rtol=1e-6)


def test_masks_zero_values_and_block_nan():
    t = jnp.array([[jnp.nan, 0.0], [0.0, 1.0]])
    s = jnp.zeros((2, 2))
    mask = jnp.array([False, True])
    kl, g = jax.value_and_grad(lambda x: losses.token_kl(t, x, mask).sum())(s)
    assert jnp.isfinite(kl) and all_finite(g)
    with pytest.raises(ValueError, match="mask has shape"):
        losses.token_kl(t, s, jnp.ones(3))
    with pytest.raises(ValueError, match="token_kl"):
        losses.token_kl(t, jnp.zeros((2, 3)))
