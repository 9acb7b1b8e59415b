"""The fused regularised loss equals the naive full-logits form, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdetox import losses
from jaxdetox.losses.fused import fused_lm_loss

B, T, D, V = 3, 7, 8, 29


@pytest.fixture(scope="module")
def inputs():
    k = jax.random.split(jax.random.key(0), 10)
    return dict(
        h=jax.random.normal(k[0], (B, T, D)),
        w=jax.random.normal(k[1], (V, D)) * 0.5,
        b=jax.random.normal(k[2], (V,)) * 0.1,
        h_ref=jax.random.normal(k[3], (B, T, D)),
        w_ref=jax.random.normal(k[4], (V, D)) * 0.5,
        h_nado=jax.random.normal(k[5], (B, T, D)),
        w_nado=jax.random.normal(k[6], (V, D)) * 0.5,
        b_nado=jax.random.normal(k[7], (V,)),
        targets=jax.random.randint(k[8], (B, T), 0, V),
        nll_w=jax.random.uniform(k[9], (B, T)) * (jnp.arange(T) % 3 != 0),
        kl_w=jnp.ones((B, T)).at[:, :2].set(0.0) * 0.7,
    )


def _naive(x, h, w, b, alpha):
    terms = losses.regularized_lm_loss_naive(
        h, (w, b), x["h_ref"], (x["w_ref"], None), x["h_nado"], (x["w_nado"], x["b_nado"]),
        x["targets"], jnp.ones((B, T)), alpha=alpha,
    )  # fmt: skip
    return jnp.sum(x["nll_w"] * terms.nll_bt) + jnp.sum(x["kl_w"] * terms.kl_bt)


def _fused(x, h, w, b, alpha, chunk_size):
    teacher = (x["h_ref"], (x["w_ref"], None), x["h_nado"], (x["w_nado"], x["b_nado"]))
    return fused_lm_loss(
        h, (w, b), x["targets"], x["nll_w"], kl_weight_bt=x["kl_w"], teacher=teacher,
        alpha=alpha, chunk_size=chunk_size,
    ).loss  # fmt: skip


@pytest.mark.parametrize("chunk_size", [1, 4, 6, None])
@pytest.mark.parametrize("bias", [False, True])
def test_value_and_gradient_equal_naive(inputs, chunk_size, bias):
    x = inputs
    params = (x["h"], x["w"], x["b"] if bias else None)
    want, want_g = jax.value_and_grad(lambda p: _naive(x, *p, 1.5))(params)
    got, got_g = jax.jit(jax.value_and_grad(lambda p: _fused(x, *p, 1.5, chunk_size)))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, wg in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(g, wg, rtol=1e-4, atol=1e-5)


def test_nll_only_and_metrics_terms(inputs):
    x = inputs
    out = fused_lm_loss(x["h"], (x["w"], None), x["targets"], x["nll_w"])
    nll = losses.naive_nll(x["h"], (x["w"], None), x["targets"], jnp.ones((B, T)))
    np.testing.assert_allclose(out.nll_bt, nll, rtol=1e-5)
    np.testing.assert_allclose(out.loss, jnp.sum(x["nll_w"] * nll), rtol=1e-5)
    assert float(jnp.abs(out.kl_bt).max()) == 0.0
    g = jax.grad(lambda h: fused_lm_loss(h, (x["w"], None), x["targets"], x["nll_w"]).loss)(x["h"])
    want = jax.grad(
        lambda h: jnp.sum(
            x["nll_w"] * losses.naive_nll(h, (x["w"], None), x["targets"], jnp.ones((B, T)))
        )
    )(x["h"])
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)
