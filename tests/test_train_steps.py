"""The pure train steps: joint == its halves, micro-batching, λ = 0, gradients vs naive."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxdetox.train import StepConfig, joint_step, lm_step, nado_step, sft_step
from jaxdetox.train import steps as steps_lib
from jaxdetox.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from tests._train_fixtures import FULL, batch, max_diff, mesh_of, runner, training


@pytest.fixture(scope="module")
def mesh():
    return mesh_of((1, 1, 1))


@pytest.fixture(scope="module")
def tr(mesh):
    return training(mesh)


@pytest.fixture(scope="module")
def run(tr, mesh):
    """`run(step_fn, batch, config)`: one compiled runner per (step, config) for the module."""
    cache = {}

    def call(step_fn, b, config=FULL):
        key = (step_fn, config)
        if key not in cache:
            cache[key] = runner(step_fn, tr, mesh, config)
        return cache[key](tr.state, b)

    return call


def test_joint_step_halves_equal_lm_step_and_nado_step(tr, run):
    b = batch(0)
    joint, jm = run(joint_step, b)
    lm, lmm = run(lm_step, b)
    nado, nm = run(nado_step, {"samples": b["samples"]})
    # Same math; only XLA's fusion of the two programs may round differently.
    assert max_diff(joint.lm, lm.lm) < 1e-7
    assert max_diff(joint.nado, nado.nado) < 1e-7
    for key in ("lm/loss", "lm/samples/kl", "lm/corpus/nll", "lm/grad_norm"):
        np.testing.assert_allclose(float(jm[key]), float(lmm[key]), rtol=1e-6, err_msg=key)
    for key in ("nado/loss", "nado/bce", "nado/consistency", "nado/grad_norm"):
        np.testing.assert_allclose(float(jm[key]), float(nm[key]), rtol=1e-6, err_msg=key)
    # lm_step leaves the NADO alone and nado_step the LLM.
    assert max_diff(lm.nado, tr.state.nado) == 0.0
    assert max_diff(nado.lm, tr.state.lm) == 0.0
    assert float(jm["lm/samples/kl"]) > 0 and float(jm["nado/consistency"]) > 0


@pytest.mark.slow
def test_joint_step_with_a_frozen_teacher_nado_equals_its_halves(tr, mesh):
    # The pipeline's joint stage: LLM_i learns from NADO_{i-1} (frozen) while NADO_i trains,
    # and the NADO decomposes another model than the teacher's reference (the shared
    # reference with a frozen teacher: tests/test_joint.py, iteration 2).
    teacher = jax.tree.map(lambda x: 0.9 * x, tr.state.nado.params)
    nado_ref = jax.tree.map(lambda x: 1.1 * x, tr.state.ref_params)
    state = tr.state.replace(teacher_nado_params=teacher, nado_ref_params=nado_ref)
    shardings = tr.shardings.replace(
        teacher_nado_params=tr.shardings.nado.params, nado_ref_params=tr.shardings.ref_params
    )
    joined = dataclasses.replace(tr, state=state, shardings=shardings)
    b = batch(3)
    joint, _ = runner(joint_step, joined, mesh)(state, b)
    lm_alone, _ = runner(lm_step, joined, mesh)(state, b)
    nado_alone, _ = runner(nado_step, joined, mesh)(state, {"samples": b["samples"]})
    # The separate stages: the LLM's with NADO_{i-1} as its NADO, the NADO's with its reference.
    lm, _ = runner(lm_step, tr, mesh)(
        tr.state.replace(nado=tr.state.nado.replace(params=teacher)), b
    )
    nado_state = tr.state.replace(ref_params=nado_ref)
    nado, _ = runner(nado_step, tr, mesh)(nado_state, {"samples": b["samples"]})
    assert max_diff(joint.lm, lm.lm) < 1e-7 and max_diff(lm_alone.lm, lm.lm) < 1e-7
    assert max_diff(joint.nado, nado.nado) < 1e-7 and max_diff(nado_alone.nado, nado.nado) < 1e-7
    assert max_diff(joint.teacher_nado_params, teacher) == 0.0  # the teacher stays NADO_{i-1}


def test_micro_batches_equal_one_big_batch(run):
    # The joint step covers both halves (LLM and NADO losses, both denominators).
    b = batch(1)
    one, m1 = run(joint_step, b)
    four, m4 = run(joint_step, b, dataclasses.replace(FULL, micro_batches=4))
    assert max_diff(one, four) < 1e-6
    for key in m1:
        np.testing.assert_allclose(
            float(m4[key]), float(m1[key]), rtol=1e-5, atol=1e-7, err_msg=key
        )


def test_lambda_zero_is_sft_step(run):
    b = batch(2)
    a, ma = run(lm_step, b, dataclasses.replace(FULL, kl_weight=0.0))
    s, ms = run(sft_step, b)
    assert max_diff(a.lm, s.lm) == 0.0
    assert float(ma["lm/loss"]) == float(ms["lm/loss"])
    # and λ > 0 really changes the update
    c, _ = run(lm_step, b)
    assert max_diff(c.lm.params, s.lm.params) > 0


def _naive_lm_loss(tr, params, b, config):
    """NLL + λ·KL with full [B, T, V] logits of student, reference and NADO."""
    lm = nnx.merge(tr.models.lm, params)
    ref = nnx.merge(tr.models.lm, tr.state.ref_params)
    nado = nnx.merge(tr.models.nado, tr.state.nado.params)
    total = 0.0
    for name, spec in config.streams:
        s = b[name]
        kw = dict(segment_ids_bt=s["segment_ids_bt"], positions_bt=s["positions_bt"])
        student, _ = lm(s["tokens_bt"], **kw)
        mask = s["loss_mask_bt"]
        n = jnp.maximum(mask.sum(), 1.0)
        log_p = jax.nn.log_softmax(student, axis=-1)
        nll = -jnp.take_along_axis(log_p, s["targets_bt"][..., None], axis=-1)[..., 0]
        total += spec.nll_weight * jnp.sum(nll * mask) / n
        if spec.kl:
            ref_logits, _ = ref(s["tokens_bt"], **kw)
            nado_logits, _ = nado(s["tokens_bt"], **kw)
            log_q = jax.nn.log_softmax(
                jax.nn.log_softmax(ref_logits, -1) + config.alpha * jax.nn.log_sigmoid(nado_logits),
                -1,
            )
            kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
            total += config.kl_weight * jnp.sum(kl * mask) / n
    return total


def test_lm_gradient_equals_naive_full_logits(tr):
    b = jax.tree.map(jnp.asarray, batch(3))
    config = dataclasses.replace(FULL, kl_weight=0.7, alpha=1.5)
    denominators = steps_lib.lm_denominators(b, config)

    def ours(params):
        loss, _ = steps_lib.lm_loss(
            params, b, models=tr.models, ref_params=tr.state.ref_params,
            nado_params=tr.state.nado.params, config=config, denominators=denominators,
        )  # fmt: skip
        return loss

    params = tr.state.lm.params
    got_loss, got = jax.jit(jax.value_and_grad(ours))(params)
    naive = jax.jit(jax.value_and_grad(lambda p: _naive_lm_loss(tr, p, b, config)))
    want_loss, want = naive(params)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-6, rtol=1e-4)


def test_nado_weights_mask_failures_and_carry_the_hosts_importance_weights(tr):
    # The per-prompt normalisation itself: tests/test_nado_defects.py (host side).
    s = jax.tree.map(jnp.asarray, batch(4)["samples"])
    plain = steps_lib.nado_weights(s, StepConfig())
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(s["label_mask_b"]))
    weighted = np.asarray(steps_lib.nado_weights(s, FULL))
    assert weighted[1] == 0.0  # the failed label
    want = np.asarray(s["label_mask_b"] * s["importance_weight_b"])
    np.testing.assert_array_equal(weighted, want)


def test_frozen_parameters_stay_put_and_hold_no_moments(mesh):
    tr = training(mesh, lm_opt=OptimizerConfig(learning_rate=1e-2, trainable=(r"^layers\.",)))
    new, _ = runner(lm_step, tr, mesh)(tr.state, batch(5))
    old = tr.state.lm.params
    np.testing.assert_array_equal(new.lm.params["embed"], old["embed"])
    np.testing.assert_array_equal(new.lm.params["lm_head"], old["lm_head"])
    assert max_diff(new.lm.params["layers"], old["layers"]) > 0
    moments = [x for x in jax.tree.leaves(tr.state.lm.opt_state) if x.ndim > 0]
    n_layers = sum(x.size for x in jax.tree.leaves(old["layers"]))
    assert sum(x.size for x in moments) == 2 * n_layers  # Adam mu + nu for layers only


def test_optimizer_schedule_and_errors():
    config = OptimizerConfig(learning_rate=1.0, warmup_steps=4, schedule="linear")
    schedule = learning_rate_schedule(config, total_steps=12)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 2, 4, 8, 12)], [0, 0.5, 1, 0.5, 0])
    cosine = learning_rate_schedule(
        dataclasses.replace(config, schedule="cosine", end_learning_rate_ratio=0.1), 12
    )
    np.testing.assert_allclose(float(cosine(12)), 0.1, rtol=1e-6)
    with pytest.raises(ValueError, match="matches no parameter"):
        make_optimizer(OptimizerConfig(trainable=("nothing",)), 1, {"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="schedule"):
        OptimizerConfig(schedule="step")


def test_clipping_bounds_the_update():
    params = {"w": jnp.zeros(3)}
    opt, _ = make_optimizer(
        OptimizerConfig(learning_rate=1.0, max_grad_norm=1e-3, b1=0.0), 1, params
    )
    grads = {"w": jnp.array([3.0, 4.0, 0.0])}
    clipped = optax.clip_by_global_norm(1e-3).update(grads, None)[0]
    np.testing.assert_allclose(optax.global_norm(clipped), 1e-3, rtol=1e-5)
    updates, _ = opt.update(grads, opt.init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))
