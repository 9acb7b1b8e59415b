"""The fused regularised loss equals the naive full-logits form, in value and gradient,
with the guards of `token_kl` (−inf teacher logits, 0·log 0) and several NADOs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdetox.losses import Teacher, reference
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
    terms = reference.regularized_lm_loss_naive(
        h, (w, b), x["h_ref"], (x["w_ref"], None), x["h_nado"], (x["w_nado"], x["b_nado"]),
        x["targets"], jnp.ones((B, T)), alpha=alpha,
    )  # fmt: skip
    return jnp.sum(x["nll_w"] * terms.nll_bt) + jnp.sum(x["kl_w"] * terms.kl_bt)


def _fused(x, h, w, b, alpha, chunk_size):
    teacher = Teacher(
        h_ref=x["h_ref"], ref_head=(x["w_ref"], None),
        h_nado=x["h_nado"], nado_head=(x["w_nado"], x["b_nado"]),
    )  # fmt: skip
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
    nll = reference.naive_nll(x["h"], (x["w"], None), x["targets"], jnp.ones((B, T)))
    np.testing.assert_allclose(out.nll_bt, nll, rtol=1e-5)
    np.testing.assert_allclose(out.loss, jnp.sum(x["nll_w"] * nll), rtol=1e-5)
    assert float(jnp.abs(out.kl_bt).max()) == 0.0
    g = jax.grad(lambda h: fused_lm_loss(h, (x["w"], None), x["targets"], x["nll_w"]).loss)(x["h"])
    want = jax.grad(
        lambda h: jnp.sum(
            x["nll_w"] * reference.naive_nll(h, (x["w"], None), x["targets"], jnp.ones((B, T)))
        )
    )(x["h"])
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)


def _teacher(x, ref_bias=None, nado_bias=None, nados=1):
    """The inputs' teacher; `nados` > 1: that many NADOs (shifted copies), tuples per field."""
    nado = (x["h_nado"], (x["w_nado"], x["b_nado"] if nado_bias is None else nado_bias))
    if nados > 1:
        h_nado = tuple(jnp.roll(nado[0], i, axis=-1) for i in range(nados))
        nado = (h_nado, tuple((nado[1][0] * (1 + i), nado[1][1]) for i in range(nados)))
    return Teacher(
        h_ref=x["h_ref"], ref_head=(x["w_ref"], ref_bias), h_nado=nado[0], nado_head=nado[1]
    )


def _fused_vs_reference(x, teacher, alpha):
    """(value, grads) of the fused loss (jit, chunks of 4 tokens) and of its full-logit reference."""

    def fused(p):
        return fused_lm_loss(
            *p, x["targets"], x["nll_w"], kl_weight_bt=x["kl_w"], teacher=teacher, alpha=alpha,
            chunk_size=4,
        ).loss  # fmt: skip

    def naive(p):
        return reference.fused_lm_loss_naive(
            *p, x["targets"], x["nll_w"], kl_weight_bt=x["kl_w"], teacher=teacher, alpha=alpha
        )

    params = (x["h"], (x["w"], x["b"]))
    return jax.jit(jax.value_and_grad(fused))(params), jax.value_and_grad(naive)(params)


MASKED = jnp.zeros(V).at[jnp.array([0, 3, 11])].set(-jnp.inf)


@pytest.mark.parametrize(
    "case",
    [
        "reference -inf",  # a masked vocabulary (top-k, banned tokens): q = 0 there
        "nado -inf",  # R = 0 on some tokens: log σ(-inf) = -inf, q = 0 there
        "nado -inf everywhere",  # R = 0 on every token: no teacher distribution, KL = 0
    ],
)
def test_teacher_with_impossible_tokens_gives_the_reference_value_and_gradient(inputs, case):
    """0·log 0 = 0 in the fused KL too: a teacher with zero-probability tokens gives a finite
    loss and exactly the full-logit (autodiff through `token_kl`) value and gradient."""
    x = inputs
    biases = {
        "reference -inf": {"ref_bias": MASKED},
        "nado -inf": {"nado_bias": x["b_nado"] + MASKED},
        "nado -inf everywhere": {"nado_bias": jnp.full((V,), -jnp.inf)},
    }[case]
    teacher = _teacher(x, **biases)
    (got, got_g), (want, want_g) = _fused_vs_reference(x, teacher, 1.5)
    assert np.isfinite(got), got
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, wg in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, wg, rtol=1e-4, atol=1e-5)
    out = fused_lm_loss(x["h"], (x["w"], x["b"]), x["targets"], x["nll_w"],
                        kl_weight_bt=x["kl_w"], teacher=teacher, alpha=1.5)  # fmt: skip
    if case == "nado -inf everywhere":
        assert float(jnp.abs(out.kl_bt).max()) == 0.0
    else:
        assert np.all(np.isfinite(out.kl_bt)) and float(out.kl_bt.min()) > 0


def test_several_nados_equal_the_reference(inputs):
    """Two constraints: the teacher sums both NADOs' guidance, one α each."""
    (got, got_g), (want, want_g) = _fused_vs_reference(
        inputs, _teacher(inputs, nados=2), (1.5, 0.5)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, wg in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(g, wg, rtol=1e-4, atol=1e-5)


def test_teacher_must_be_the_named_type(inputs):
    x = inputs
    legacy = tuple(_teacher(x))  # the old positional 4-tuple
    with pytest.raises(TypeError, match="losses.Teacher"):
        fused_lm_loss(x["h"], (x["w"], None), x["targets"], x["nll_w"], teacher=legacy)
