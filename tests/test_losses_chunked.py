"""Chunked regularised LM loss == naive full-logits form (values, gradients), and its memory
(and the fused training loss's)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdetox import losses
from jaxdetox.losses import reference

FLOAT_ARGS = ("h_btd", "head", "h_ref_btd", "ref_head", "h_nado_btd", "nado_head")


def make_inputs(seed, b, t, d, v, *, student_bias=False, dtype=jnp.float32):
    """Random student/teacher hidden states and heads (numpy RNG: no per-op compiles)."""
    rng = np.random.default_rng(seed)

    def arr(*shape, scale=1.0):
        return jnp.asarray(rng.normal(0, scale, size=shape), dtype)

    h, h_ref, h_nado = arr(b, t, d), arr(b, t, d), arr(b, t, d)
    w, w_ref, w_nado = (arr(v, d, scale=2 / np.sqrt(d)) for _ in range(3))
    mask = rng.uniform(size=(b, t)) > 0.25
    targets = rng.integers(0, v, size=(b, t))
    return {
        "h_btd": h,
        "head": (w, arr(v) if student_bias else None),
        "h_ref_btd": h_ref,
        "ref_head": (w_ref, arr(v)),
        "h_nado_btd": h_nado,
        "nado_head": (w_nado, arr(v)),
        "targets_bt": jnp.asarray(np.where(mask, targets, -100), jnp.int32),  # padding ids
        "mask_bt": jnp.asarray(mask),
        "kl_mask_bt": jnp.asarray(rng.uniform(size=(b, t)) > 0.25),
    }


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def vjp_all(inputs, cot_nll, cot_kl, chunk_size):
    """Outputs and the VJP w.r.t. every float input, for chunked (chunk_size) or naive (0)."""
    rest = {k: v for k, v in inputs.items() if k not in FLOAT_ARGS}

    def f(floats):
        if chunk_size == 0:
            return reference.regularized_lm_loss_naive(**floats, **rest, alpha=0.8)
        return losses.regularized_lm_loss(**floats, **rest, alpha=0.8, chunk_size=chunk_size)

    out, pullback = jax.vjp(f, {k: inputs[k] for k in FLOAT_ARGS})
    return out, pullback(losses.RegularizedLoss(cot_nll, cot_kl))[0]


@pytest.mark.parametrize(
    ("b", "t", "d", "v", "chunk", "student_bias"),
    [
        (2, 5, 8, 11, 4, False),  # 2 time steps per chunk, T = 5: padded tail
        (3, 7, 16, 37, 6, True),  # 2 steps per chunk, T = 7
        (1, 6, 4, 5, 3, False),  # divides exactly
        (4, 3, 8, 13, 2, False),  # chunk_size < B: one time step per chunk
        (2, 3, 8, 13, None, True),  # default chunk (128) larger than B·T
    ],
)
def test_chunked_equals_naive_values_and_grads(b, t, d, v, chunk, student_bias):
    inputs = make_inputs(b * 100 + t, b, t, d, v, student_bias=student_bias)
    rng = np.random.default_rng(7)
    # arbitrary per-token cotangents: covers any λ and any per-token weighting by the caller
    cot_nll, cot_kl = (jnp.asarray(rng.normal(size=(b, t)), jnp.float32) for _ in range(2))
    out_c, grads_c = jax.device_get(vjp_all(inputs, cot_nll, cot_kl, chunk))
    out_n, grads_n = jax.device_get(vjp_all(inputs, cot_nll, cot_kl, 0))
    assert out_c.nll_bt.shape == (b, t) and out_c.kl_bt.dtype == np.float32
    np.testing.assert_allclose(out_c.nll_bt, out_n.nll_bt, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(out_c.kl_bt, out_n.kl_bt, rtol=1e-6, atol=1e-5)
    # masks are honoured: zeros where masked, positive KL elsewhere
    mask, kl_mask = np.asarray(inputs["mask_bt"]), np.asarray(inputs["kl_mask_bt"])
    assert np.all(out_c.nll_bt[~mask] == 0) and np.all(out_c.nll_bt[mask] > 0)
    assert np.all(out_c.kl_bt[~kl_mask] == 0) and np.all(out_c.kl_bt[kl_mask] > 0)
    for key in FLOAT_ARGS:
        for gc, gn in zip(jax.tree.leaves(grads_c[key]), jax.tree.leaves(grads_n[key])):
            np.testing.assert_allclose(gc, gn, atol=1e-5, rtol=1e-5, err_msg=key)
    # the student gets gradients, the teacher (reference LM and NADO) none at all
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads_c["head"]))
    assert np.abs(grads_c["h_btd"]).max() > 0
    for key in ("h_ref_btd", "ref_head", "h_nado_btd", "nado_head"):
        assert all(np.all(g == 0) for g in jax.tree.leaves((grads_c[key], grads_n[key]))), key


@jax.jit
def explicit_composition(x):
    """The reference written out: logits → log_softmax / log_sigmoid → KL, NLL (jax.nn only)."""
    logits = x["h_btd"] @ x["head"][0].T
    ref = x["h_ref_btd"] @ x["ref_head"][0].T + x["ref_head"][1]
    nado = x["h_nado_btd"] @ x["nado_head"][0].T + x["nado_head"][1]
    teacher = jax.nn.log_softmax(jax.nn.log_softmax(ref) + jax.nn.log_sigmoid(nado))
    log_p = jax.nn.log_softmax(logits)
    kl = (jnp.exp(teacher) * (teacher - log_p)).sum(-1)
    tgt = jnp.maximum(x["targets_bt"], 0)[..., None]
    nll = -jnp.take_along_axis(log_p, tgt, -1)[..., 0]
    return jnp.where(x["mask_bt"], nll, 0), jnp.where(x["kl_mask_bt"], kl, 0)


def test_naive_form_is_composition_of_token_losses():
    x = make_inputs(0, 2, 3, 4, 7)
    out = jax.jit(reference.regularized_lm_loss_naive)(**x)
    nll, kl = explicit_composition(x)
    np.testing.assert_allclose(out.kl_bt, kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.nll_bt, nll, rtol=1e-5)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def nll_value_and_grad(h, head, targets, mask, chunk_size):
    def f(h, head):
        if chunk_size == 0:
            return reference.naive_nll(h, head, targets, mask).sum()
        return losses.chunked_nll(h, head, targets, mask, chunk_size=chunk_size).sum()

    return jax.value_and_grad(f, (0, 1))(h, head)


def test_chunked_nll_equals_naive():
    x = make_inputs(1, 3, 5, 8, 19, student_bias=True)
    args = (x["h_btd"], x["head"], x["targets_bt"], x["mask_bt"])
    (vc, gc), (vn, gn) = (jax.device_get(nll_value_and_grad(*args, c)) for c in (4, 0))
    np.testing.assert_allclose(vc, vn, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gn)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the regularised loss's NLL is the same per-token number
    reg = jax.jit(functools.partial(losses.regularized_lm_loss, chunk_size=4))(**x)
    np.testing.assert_allclose(reg.nll_bt.sum(), vn, rtol=1e-6)


@pytest.mark.slow
def test_bf16_inputs_compute_in_float32():
    x = make_inputs(2, 2, 6, 16, 23, dtype=jnp.bfloat16)
    out = jax.jit(functools.partial(losses.regularized_lm_loss, chunk_size=5))(**x)
    assert out.nll_bt.dtype == jnp.float32 and out.kl_bt.dtype == jnp.float32
    ref = jax.jit(reference.regularized_lm_loss_naive)(**x)
    np.testing.assert_allclose(out.kl_bt, ref.kl_bt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.nll_bt, ref.nll_bt, rtol=1e-5, atol=1e-5)
    # bf16 weights: the head gradient comes back in bf16 but is summed over chunks in
    # float32, so it is the float32 gradient of the same inputs rounded once.
    x32 = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, x)
    ones = jnp.ones(x["mask_bt"].shape, jnp.float32)
    _, g16 = vjp_all(x, ones, ones, 1)  # one time step per chunk: 6 chunks to sum
    _, g32 = vjp_all(x32, ones, ones, 0)
    w16, w32 = np.asarray(g16["head"][0].astype(jnp.float32)), np.asarray(g32["head"][0])
    assert g16["head"][0].dtype == jnp.bfloat16
    np.testing.assert_allclose(w16, w32, rtol=2**-8, atol=1e-6)


def test_extreme_teacher_and_kl_mask_default():
    """NADO logits ~±1e30 (R ∈ {0, 1}) and huge reference logits: no NaN, finite grads."""
    x = make_inputs(3, 2, 4, 8, 9)
    x["nado_head"] = (x["nado_head"][0] * 1e29, x["nado_head"][1])
    x["ref_head"] = (x["ref_head"][0] * 1e4, x["ref_head"][1])
    del x["kl_mask_bt"]  # defaults to mask_bt
    rest = {k: v for k, v in x.items() if k not in ("h_btd", "head")}

    @jax.jit
    def loss(h, head):
        out = losses.regularized_lm_loss(h, head, **rest, chunk_size=3)
        return out.nll_bt.sum() + 0.5 * out.kl_bt.sum(), out

    (val, out), grads = jax.device_get(
        jax.value_and_grad(loss, (0, 1), has_aux=True)(x["h_btd"], x["head"])
    )
    assert np.isfinite(val) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.all(out.kl_bt[~np.asarray(x["mask_bt"])] == 0)


def test_shape_errors_name_the_tensor():
    x = make_inputs(4, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="h_ref_btd"):
        losses.regularized_lm_loss(**{**x, "h_ref_btd": x["h_ref_btd"][:, :2]})
    with pytest.raises(ValueError, match="head_logits: hidden size"):
        losses.regularized_lm_loss(**{**x, "head": (x["head"][0][:, :3], None)})
    with pytest.raises(ValueError, match="chunk_size"):
        losses.regularized_lm_loss(**x, chunk_size=0)
    with pytest.raises(ValueError, match=r"regularized_lm_loss: kl_mask_bt must be \[B, T\]"):
        losses.regularized_lm_loss(**{**x, "kl_mask_bt": x["mask_bt"][:, :, None]})
    guided = {k: x[k] for k in ("h_ref_btd", "ref_head", "nado_head", "targets_bt", "mask_bt")}
    with pytest.raises(ValueError, match=r"chunked_guided_nll: h_nado_btd must be \[B, T, D\]"):
        losses.chunked_guided_nll(**guided, h_nado_btd=x["h_nado_btd"][:1])


def test_default_chunk_size():
    assert losses.default_chunk_size(2048) == 256  # Llama 3.2 1B: [256, 128256] blocks
    assert losses.default_chunk_size(576) == 128 and losses.default_chunk_size(64) == 128
    assert losses.default_chunk_size(16384) == 1024


def _temp_bytes(fn, *shapes):
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _memory_args(b, t, d, v):
    f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    hid, head, tok = f32((b, t, d)), f32((v, d)), jax.ShapeDtypeStruct((b, t), jnp.int32)
    return (hid, head, hid, head, hid, head, f32((v,)), tok, tok)


def _reg_loss(h, w, hr, wr, hn, wn, bn, tg, m, naive=False):
    a = (h, (w, None), hr, (wr, None), hn, (wn, bn), tg, m)
    out = (reference.regularized_lm_loss_naive if naive else losses.regularized_lm_loss)(*a)
    return out.nll_bt.sum() + 0.1 * out.kl_bt.sum()


def _ce_loss(h, w, hr, wr, hn, wn, bn, tg, m):
    return losses.chunked_nll(h, (w, None), tg, m).sum()


@pytest.mark.slow
def test_chunked_memory_is_close_to_plain_chunked_ce():
    """Compiled temp memory: regularised ≤ 1.2× plain chunked CE, flat in B·T, unlike naive."""
    b, t, d, v = 4, 256, 1024, 32_000  # default chunk 128 = D/8
    args = _memory_args(b, t, d, v)
    reg_temp, ce_temp = _temp_bytes(_reg_loss, *args), _temp_bytes(_ce_loss, *args)
    naive_temp = _temp_bytes(functools.partial(_reg_loss, naive=True), *args)
    assert reg_temp <= 1.2 * ce_temp, (reg_temp, ce_temp)
    assert naive_temp > 3 * b * t * v * 4  # several [B, T, V] float32 buffers
    assert reg_temp < naive_temp / 4
    # 4× the tokens: the chunked loss only grows by the [B, T, D]-sized terms
    reg_temp_4x = _temp_bytes(_reg_loss, *_memory_args(4 * b, t, d, v))
    assert reg_temp_4x - reg_temp <= 3 * (3 * b * t * d * 4), (reg_temp, reg_temp_4x)


def _fused_loss(h, w, hr, wr, hn, wn, bn, tg, m):
    teacher = losses.Teacher(h_ref=hr, ref_head=(wr, None), h_nado=hn, nado_head=(wn, bn))
    return losses.fused_lm_loss(h, (w, None), tg, m, kl_weight_bt=0.1 * m, teacher=teacher).loss


@pytest.mark.slow
def test_fused_memory_is_at_most_plain_chunked_ce():
    """The train steps' loss (NLL + KL, its gradient formed in the forward pass): compiled
    temp memory ≤ 1.2× plain chunked CE, and 4× the tokens only add [B, T, D]-sized terms."""
    b, t, d, v = 4, 256, 1024, 32_000  # default chunk 128 = D/8
    args = _memory_args(b, t, d, v)
    fused_temp, ce_temp = _temp_bytes(_fused_loss, *args), _temp_bytes(_ce_loss, *args)
    assert fused_temp <= 1.2 * ce_temp, (fused_temp, ce_temp)
    fused_temp_4x = _temp_bytes(_fused_loss, *_memory_args(4 * b, t, d, v))
    assert fused_temp_4x - fused_temp <= 3 * (3 * b * t * d * 4), (fused_temp, fused_temp_4x)


def test_batch_sharded_inputs_stay_sharded():
    """With B sharded over 8 devices: same numbers, no all-gather, dh keeps the sharding."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",))
    x = make_inputs(5, 8, 12, 16, 29)

    def place(a):
        rows = a.ndim >= 2 and a.shape[:2] == (8, 12)
        return jax.device_put(a, NamedSharding(mesh, P("data") if rows else P()))

    @jax.jit
    def grads(x):
        rest = {k: v for k, v in x.items() if k not in ("h_btd", "head")}

        def loss(h, head):
            out = losses.regularized_lm_loss(h, head, **rest, chunk_size=32)  # 4 steps per chunk
            return out.nll_bt.sum() + 0.5 * out.kl_bt.sum()

        return jax.value_and_grad(loss, (0, 1))(x["h_btd"], x["head"])

    sharded = jax.tree.map(place, x)
    got, want = grads(sharded), grads(x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert tuple(got[1][0].sharding.spec)[:1] == ("data",)  # dh sharded like h
    assert "all-gather" not in grads.lower(sharded).compile().as_text()


@functools.partial(jax.jit, static_argnames=("chunk_size", "consistency", "reverse"))
def nado_vjp(x, labels, cot_bce, cot_reg, chunk_size, consistency, reverse):
    """NADO terms from hidden states and their VJP w.r.t. NADO and base inputs."""
    floats = {
        "h_nado_btd": x["h_nado_btd"],
        "nado_head": x["nado_head"],
        "h_base_btd": x["h_ref_btd"],
        "base_head": x["ref_head"],
    }

    def f(floats):
        args = (floats["h_nado_btd"], floats["nado_head"], floats["h_base_btd"])
        args += (floats["base_head"], x["targets_bt"], labels, x["mask_bt"])
        kw = {"consistency": consistency, "reverse": reverse}
        if chunk_size == 0:
            return reference.nado_losses_naive(*args, **kw)
        return losses.nado_losses(*args, **kw, chunk_size=chunk_size)

    out, pullback = jax.vjp(f, floats)
    return out, pullback(losses.NadoLoss(cot_bce, cot_reg))[0]


@pytest.mark.parametrize(
    ("chunk", "consistency", "reverse"),
    [(4, "kl", False), (6, "squared", False), (None, "kl", True), (4, None, False)],
)
def test_nado_losses_from_hidden_equal_naive(chunk, consistency, reverse):
    b, t = 2, 7
    x = make_inputs(11, b, t, 8, 17)
    rng = np.random.default_rng(3)
    labels = jnp.asarray(rng.uniform(size=b), jnp.float32)
    cot_bce, cot_reg = (jnp.asarray(rng.normal(size=(b, t)), jnp.float32) for _ in range(2))
    got, g_got = jax.device_get(nado_vjp(x, labels, cot_bce, cot_reg, chunk, consistency, reverse))
    want, g_want = jax.device_get(nado_vjp(x, labels, cot_bce, cot_reg, 0, consistency, reverse))
    np.testing.assert_allclose(got.bce_bt, want.bce_bt, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.consistency_bt, want.consistency_bt, rtol=1e-5, atol=1e-6)
    if consistency is not None:
        assert np.abs(got.consistency_bt).max() > 0
    for key in ("h_nado_btd", "nado_head"):
        for a, w in zip(jax.tree.leaves(g_got[key]), jax.tree.leaves(g_want[key])):
            np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5, err_msg=key)
    for key in ("h_base_btd", "base_head"):  # the base LM is frozen
        assert all(np.all(g == 0) for g in jax.tree.leaves((g_got[key], g_want[key]))), key
