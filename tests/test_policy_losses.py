"""REINFORCE and DPO losses on fixtures with known answers (docs/baselines.md)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdetox.losses import dpo_loss, moving_average, reinforce_loss
from jaxdetox.pipeline.baselines import keep_threshold, preference_pairs


def _bandit_loss(theta, rewards, baseline, kl_coef=0.0, ref_logits=None):
    """Two-armed bandit, one sample of each arm: the mean REINFORCE loss."""
    logp = jax.nn.log_softmax(theta)
    kl = None if ref_logits is None else logp - jax.nn.log_softmax(ref_logits)
    terms = reinforce_loss(logp, rewards, baseline, jnp.ones(2), kl_b=kl, kl_coef=kl_coef)
    return jnp.mean(terms.loss_b)


def test_reinforce_gradient_on_a_two_sample_bandit():
    theta = jnp.zeros(2)
    rewards = jnp.array([1.0, 0.0])  # arm 0 is the clean one
    grad = jax.grad(_bandit_loss)(theta, rewards, 0.5)
    # A = (0.5, -0.5); ∇ = -(1/2) Σ_b A_b (e_b - π) = (-0.25, 0.25) at π = (1/2, 1/2).
    np.testing.assert_allclose(grad, [-0.25, 0.25], atol=1e-6)
    # A gradient-descent step moves probability to the rewarded arm.
    after = jax.nn.softmax(theta - 0.1 * grad)
    assert after[0] > 0.5 > after[1]


def test_reinforce_baseline_changes_the_sample_gradient_not_its_expectation():
    theta = jnp.array([0.3, -0.2])
    rewards = jnp.array([1.0, 0.0])
    pi = jax.nn.softmax(theta)

    def expected_grad(baseline):
        # E_y~π[∇ loss(y)] over both arms, one sample at a time.
        g = [jax.grad(lambda t, y=y: -(rewards[y] - baseline) * jax.nn.log_softmax(t)[y])(theta)
             for y in (0, 1)]  # fmt: skip
        return pi[0] * g[0] + pi[1] * g[1]

    np.testing.assert_allclose(expected_grad(0.0), expected_grad(0.7), atol=1e-6)
    # The exact policy gradient of -E[r] = -π_0.
    exact = jax.grad(lambda t: -jax.nn.softmax(t)[0])(theta)
    np.testing.assert_allclose(expected_grad(0.4), exact, atol=1e-6)


def test_reinforce_kl_penalty_pulls_towards_the_reference():
    theta = jnp.array([1.0, 0.0])  # the policy prefers arm 0 more than the reference does
    equal = jnp.array([0.5, 0.5])  # no reward signal: only the KL penalty acts
    grad = jax.grad(_bandit_loss)(theta, equal, 0.5, kl_coef=1.0, ref_logits=jnp.zeros(2))
    after = jax.nn.softmax(theta - 0.1 * grad)
    assert after[0] < jax.nn.softmax(theta)[0]


def test_reinforce_masked_rows_contribute_nothing():
    logp = jnp.array([-1.0, -2.0])
    terms = reinforce_loss(logp, jnp.array([1.0, 0.0]), 0.2, jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(terms.loss_b, [0.8, 0.0], atol=1e-6)
    np.testing.assert_allclose(terms.advantage_b, [0.8, 0.0], atol=1e-6)


def test_dpo_loss_against_a_hand_computed_value():
    beta = 0.5
    # margin = (-1 - -1.5) - (-2 - -1.5) = 0.5 + 0.5 = 1.0; loss = -log σ(0.5) = log(1 + e^-0.5)
    terms = dpo_loss(
        jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([-1.5]), jnp.array([-1.5]), beta,
        jnp.array([1.0]),
    )  # fmt: skip
    np.testing.assert_allclose(terms.margin_b, [1.0], atol=1e-6)
    np.testing.assert_allclose(terms.loss_b, [math.log1p(math.exp(-0.5))], atol=1e-6)
    # d loss / d log π(y_w) = -β σ(-β m): raising the chosen sample lowers the loss.
    grad = jax.grad(
        lambda w: dpo_loss(w, jnp.array([-2.0]), jnp.array([-1.5]), jnp.array([-1.5]), beta,
                           jnp.array([1.0])).loss_b.sum()
    )(jnp.array([-1.0]))  # fmt: skip
    np.testing.assert_allclose(grad, [-beta * (1 - 1 / (1 + math.exp(-0.5)))], atol=1e-6)


def test_dpo_loss_at_zero_margin_is_log_two_and_masks_rows():
    zeros = jnp.zeros(2)
    terms = dpo_loss(zeros, zeros, zeros, zeros, 0.1, jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(terms.loss_b, [math.log(2), 0.0], atol=1e-6)


def test_moving_average():
    assert moving_average(None, 0.4, 0.9) == pytest.approx(0.4)
    assert moving_average(0.4, 1.0, 0.9) == pytest.approx(0.46)


def test_preference_pairs_rank_by_toxicity_within_a_prompt():
    prompt_ids = np.array([7, 7, 7, 7, 9, 9, 9])
    toxicity = np.array([0.9, 0.1, 0.5, 0.3, 0.2, 0.2, 0.8])
    ok = np.array([True, True, True, True, True, True, False])
    chosen, rejected = preference_pairs(prompt_ids, toxicity, ok)
    # prompt 7: (0.1 vs 0.9), (0.3 vs 0.5); prompt 9: tie among scored rows -> no pair
    assert chosen.tolist() == [1, 3] and rejected.tolist() == [0, 2]
    chosen, _ = preference_pairs(prompt_ids, toxicity, ok, min_gap=0.5)
    assert chosen.tolist() == [1]


def test_keep_threshold_is_the_lower_quantile_of_scored_samples():
    toxicity = np.array([0.1, 0.4, 0.2, 0.9, np.nan])
    ok = np.array([True, True, True, True, False])
    assert keep_threshold(toxicity, ok, 0.5) == pytest.approx(0.2)
    assert keep_threshold(toxicity, ok, 1.0) == pytest.approx(0.9)


# ----------------------------------------------------------------------------- the steps


def _policy_run(step_fn, config, host_batch, lr=1e-2):
    """One step of `step_fn` on the tiny Llama; returns (logprob before, after) per stream."""
    from jaxdetox.train.policy import sequence_logprobs
    from tests._train_fixtures import mesh_of, runner, training

    mesh = mesh_of((1, 1, 1))
    tr = training(mesh, lr=lr)

    def logps(params):
        return {
            name: np.asarray(sequence_logprobs(tr.models.lm, params, s))
            for name, s in host_batch.items()
        }

    before = logps(tr.state.lm.params)
    state, metrics = runner(step_fn, tr, mesh, config)(tr.state, host_batch)
    return before, logps(state.lm.params), metrics


def _two_rows(seed=0):
    from tests._train_fixtures import stream

    s = stream(np.random.default_rng(seed), batch=2)
    s["segment_ids_bt"][:] = 1
    s["positions_bt"] = np.tile(np.arange(s["tokens_bt"].shape[1], dtype=np.int32), (2, 1))
    return s


def test_reinforce_step_raises_the_rewarded_sample():
    from jaxdetox.train.policy import PolicyConfig, reinforce_step

    s = _two_rows()
    s |= dict(reward_b=np.array([1.0, 0.0], np.float32), baseline_b=np.full(2, 0.5, np.float32),
              label_mask_b=np.ones(2, np.float32))  # fmt: skip
    before, after, metrics = _policy_run(reinforce_step, PolicyConfig(), {"samples": s})
    change = after["samples"] - before["samples"]
    assert change[0] > 0 > change[1]
    assert float(metrics["lm/reinforce/advantage"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["lm/reinforce/reward"]) == pytest.approx(0.5)


def test_dpo_step_widens_the_preference_margin():
    from jaxdetox.train.policy import PolicyConfig, dpo_step

    chosen, rejected = _two_rows(1), _two_rows(2)
    chosen["label_mask_b"] = np.ones(2, np.float32)
    batch = {"chosen": chosen, "rejected": rejected}
    before, after, metrics = _policy_run(dpo_step, PolicyConfig(beta=0.5), batch)
    margin = lambda d: d["chosen"] - d["rejected"]  # noqa: E731
    assert np.all(margin(after) > margin(before))
    assert 0 < float(metrics["lm/dpo/loss"]) and float(metrics["lm/dpo/pairs"]) == 2


def test_chunked_guided_nll_equals_the_full_logits_form():
    from jaxdetox.losses import chunked_guided_nll, guided_log_probs, head_logits, token_nll

    rng = np.random.default_rng(0)
    b, t, d, v = 2, 7, 8, 11
    h_ref, h_nado = (jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32) for _ in range(2))
    ref_head = (jnp.asarray(rng.normal(size=(v, d)), jnp.float32), None)
    nado_head = (jnp.asarray(rng.normal(size=(v, d)), jnp.float32), jnp.zeros(v))
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) > 0.3)
    log_q = guided_log_probs(head_logits(h_ref, ref_head), head_logits(h_nado, nado_head), 2.0)
    expected = token_nll(log_q, targets, mask)
    got = chunked_guided_nll(h_ref, ref_head, h_nado, nado_head, targets, mask, alpha=2.0,
                             chunk_size=4)  # fmt: skip
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
