"""Several constraints, checked exactly by enumerating every sequence of a tiny vocabulary.

The guided teacher log q ∝ log p + Σ_c α_c·log σ(h_c) (α = 1) equals the projection of p onto
the product C_1·C_2, q*(y) = p(y)·C_1(y)·C_2(y)/Z, when each NADO is exact: NADO_2 is the
success rate of C_2 under the model guided by NADO_1 (so the chain telescopes for any
constraints), or both are exact under p and the constraints are independent given the
prefix. Otherwise (both exact under p, dependent constraints) it is an approximation: the
third test shows the gap is real. docs/constraints.md explains.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdetox import losses
from tests import _enumeration as en

CASES = [(4, 3), (3, 4), (5, 3)]


def guided_sequence_log_q(lm, nado_tables, seqs):
    """log q(y) of every sequence under the guided teacher with these NADO tables."""
    base = jnp.asarray(en.aligned(list(lm.logits), seqs))
    heads = [jnp.asarray(en.aligned(t, seqs)) for t in nado_tables]
    log_q = losses.guided_log_probs(base, heads, [1.0] * len(heads))
    return np.asarray(jnp.take_along_axis(log_q, jnp.asarray(seqs)[..., None], -1)[..., 0].sum(-1))


def projection(lm, oracles, seqs):
    """log q*(y) = log p(y) + Σ log C_c(y) − log Z over all sequences."""
    log_w = lm.sequence_log_probs()[tuple(seqs.T)]
    for c in oracles:
        log_w = log_w + np.log(c[tuple(seqs.T)])
    return log_w - np.logaddexp.reduce(log_w)


def guided_lm(lm, rates):
    """The TinyLM p(v|·)·R(·∘v) (unnormalised logits; TinyLM normalises)."""
    logits = tuple(lg + np.log(r) for lg, r in zip(lm.log_probs(), rates[1:]))
    return en.TinyLM(lm.vocab, lm.length, logits)


@pytest.mark.parametrize(("vocab", "length"), CASES)
def test_chained_exact_nados_give_the_projection_onto_the_product(vocab, length):
    rng = np.random.default_rng(10 * vocab + length)
    lm = en.random_lm(rng, vocab, length)
    c1 = en.random_oracle(rng, vocab, length, hard=False)
    c2 = en.random_oracle(rng, vocab, length, hard=False)
    seqs = en.all_sequences(vocab, length)
    r1 = en.success_rates(lm, c1)
    # NADO_2: the success rate of C_2 under the model already guided by NADO_1.
    r2 = en.success_rates(guided_lm(lm, r1), c2)
    with jax.enable_x64(True):
        got = guided_sequence_log_q(lm, [en.exact_nado_logits(r1), en.exact_nado_logits(r2)], seqs)
    np.testing.assert_allclose(got, projection(lm, [c1, c2], seqs), atol=1e-10)
    # One constraint: the same function is the single projection (docs/method.md §1).
    with jax.enable_x64(True):
        one = guided_sequence_log_q(lm, [en.exact_nado_logits(r1)], seqs)
    np.testing.assert_allclose(one, projection(lm, [c1], seqs), atol=1e-10)


@pytest.mark.parametrize(("vocab", "length"), CASES)
def test_independent_constraints_need_only_nados_exact_under_p(vocab, length):
    rng = np.random.default_rng(vocab + 7 * length)
    # Tokens independent under p; C_1 reads the first two tokens, C_2 the rest.
    step = rng.normal(0, 1.5, size=(length, vocab))
    lm = en.TinyLM(
        vocab, length, tuple(np.broadcast_to(step[t], (vocab,) * (t + 1)) for t in range(length))
    )
    grid = np.indices((vocab,) * length)
    c1 = rng.uniform(0.05, 0.95, size=(vocab, vocab))[grid[0], grid[1]]
    c2 = rng.uniform(0.05, 0.95, size=(vocab,) * (length - 2))[tuple(grid[2:])]
    seqs = en.all_sequences(vocab, length)
    heads = [en.exact_nado_logits(en.success_rates(lm, c)) for c in (c1, c2)]
    with jax.enable_x64(True):
        got = guided_sequence_log_q(lm, heads, seqs)
    np.testing.assert_allclose(got, projection(lm, [c1, c2], seqs), atol=1e-10)


def test_dependent_constraints_with_nados_exact_under_p_are_an_approximation():
    vocab, length = 4, 3
    rng = np.random.default_rng(3)
    lm = en.random_lm(rng, vocab, length)
    c1, c2 = (en.random_oracle(rng, vocab, length, hard=False) for _ in range(2))
    seqs = en.all_sequences(vocab, length)
    heads = [en.exact_nado_logits(en.success_rates(lm, c)) for c in (c1, c2)]
    with jax.enable_x64(True):
        got = guided_sequence_log_q(lm, heads, seqs)
    target = projection(lm, [c1, c2], seqs)
    assert np.max(np.abs(got - target)) > 1e-3
    # ... but a close one: the total variation to the product projection is small.
    assert 0.5 * np.abs(np.exp(got) - np.exp(target)).sum() < 0.2


def test_alphas_must_match_the_nados():
    x = jnp.zeros((2, 5))
    with pytest.raises(ValueError, match="2 NADOs but 3 alphas"):
        losses.guided_log_probs(x, [x, x], [1.0, 1.0, 1.0])


def test_lm_step_with_two_nados_sums_their_guidance():
    """Two copies of one NADO with α = (a, b) are that NADO with α = a + b (log σ terms add)."""
    import dataclasses

    from jaxdetox.train import StepConfig, lm_step
    from tests._train_fixtures import batch, max_diff, mesh_of, runner, training

    mesh = mesh_of((1, 1, 1))
    tr = training(mesh)
    config = StepConfig(alpha=1.5)
    one_state, one = runner(lm_step, tr, mesh, config)(tr.state, batch(0))
    nado = tr.state.nado.params
    two = dataclasses.replace(tr, models=dataclasses.replace(tr.models, nado_names=("a", "b")))
    state = tr.state.replace(nado=tr.state.nado.replace(params={"a": nado, "b": nado}))
    shard = tr.shardings.nado.params
    two = dataclasses.replace(
        two,
        shardings=two.shardings.replace(
            nado=two.shardings.nado.replace(params={"a": shard, "b": shard})
        ),
    )
    config2 = StepConfig(alphas=(1.0, 0.5))
    two_state, two_m = runner(lm_step, two, mesh, config2)(state, batch(0))
    for key in ("lm/samples/kl", "lm/loss", "lm/grad_norm"):
        np.testing.assert_allclose(two_m[key], one[key], rtol=1e-5)
    assert max_diff(two_state.lm.params, one_state.lm.params) < 1e-6
