"""The method's identities, checked exactly by enumerating every sequence of a tiny LM.

docs/method.md §1: q*(y) = p(y)·C(y)/R(x) token by token through the guided teacher built from
the exact R; the chain rule of token_kl gives the sequence KL; KL(q*‖p) = E_q*[log C] − log R(x);
the Bellman consistency regulariser vanishes exactly at R; the population BCE is minimised at R.
All in float64.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdetox import losses
from tests import _enumeration as en

CASES = [(4, 3, False), (4, 3, True), (3, 4, False), (3, 4, True), (5, 3, False)]
KINDS = (("kl", False), ("kl", True), ("squared", False), ("ratio", False))


def make_case(vocab, length, hard, seed=0):
    rng = np.random.default_rng(seed + 10 * vocab + length + 100 * hard)
    lm = en.random_lm(rng, vocab, length)
    oracle = en.random_oracle(rng, vocab, length, hard)
    rates = en.success_rates(lm, oracle)
    seqs = en.all_sequences(vocab, length)
    return {
        "lm": lm,
        "rates": rates,
        "seqs": seqs,
        "base_ntv": en.aligned(list(lm.logits), seqs),
        "nado_ntv": en.aligned(en.exact_nado_logits(rates), seqs),
        "log_p_n": lm.sequence_log_probs()[tuple(seqs.T)],
        "c_n": oracle[tuple(seqs.T)],
        "rng": rng,
    }


def q_star(case):
    """q*(y) = p(y)·C(y)/R(x) over all sequences, float64 numpy."""
    return np.exp(case["log_p_n"]) * case["c_n"] / case["rates"][0]


@jax.jit
def teacher_and_kl(base_ntv, nado_ntv, student_ntv, seqs):
    """Guided teacher from (base, NADO), log q(y) per sequence, and token_kl to the student."""
    log_q_ntv = losses.guided_log_probs(base_ntv, nado_ntv, alpha=1.0)
    log_q_n = jnp.take_along_axis(log_q_ntv, seqs[..., None], -1)[..., 0].sum(-1)
    return log_q_n, losses.token_kl(log_q_ntv, student_ntv)


@functools.partial(jax.jit, static_argnames=("kinds",))
def consistency_all_kinds(nado_ntv, base_ntv, seqs, mask, kinds):
    """nado_consistency for several (kind, reverse) pairs in one compiled call."""
    return [
        losses.nado_consistency(nado_ntv, base_ntv, seqs, mask, kind=k, reverse=r) for k, r in kinds
    ]


@functools.partial(jax.jit, static_argnames=("kinds",))
def consistency_grads_all_kinds(nado_ntv, base_ntv, seqs, mask, kinds):
    """Gradients of Σ nado_consistency w.r.t. (NADO, base) logits for each (kind, reverse)."""

    def total(h, b, kind, reverse):
        return losses.nado_consistency(h, b, seqs, mask, kind=kind, reverse=reverse).sum()

    return [jax.grad(total, argnums=(0, 1))(nado_ntv, base_ntv, k, r) for k, r in kinds]


@pytest.mark.parametrize(("vocab", "length", "hard"), CASES)
def test_rates_are_consistent_and_end_at_oracle(vocab, length, hard):
    case = make_case(vocab, length, hard)
    r0 = case["rates"][0]
    np.testing.assert_allclose(r0, np.sum(np.exp(case["log_p_n"]) * case["c_n"]), rtol=1e-12)
    assert 0 < r0 < 1
    # R(x) = Σ_v p(v|x)·σ(h(x)[v]): the one-step expectation at the empty prefix
    with jax.enable_x64(True):
        log_s, log_1ms = losses.one_step_expectation(
            jnp.asarray(case["base_ntv"][:1, 0]), jnp.asarray(case["nado_ntv"][:1, 0])
        )
        np.testing.assert_allclose(np.exp(log_s), r0, rtol=1e-12)
        np.testing.assert_allclose(np.exp(log_1ms), 1 - r0, rtol=1e-12)


@pytest.mark.parametrize(("vocab", "length", "hard"), CASES)
def test_teacher_multiplies_out_and_chain_rule_gives_sequence_kl(vocab, length, hard):
    case = make_case(vocab, length, hard)
    qs = q_star(case)
    support = qs > 0
    other = en.random_lm(case["rng"], vocab, length)
    with jax.enable_x64(True):
        for student in (case["lm"], other):
            log_q_n, kl_nt = teacher_and_kl(
                jnp.asarray(case["base_ntv"]),
                jnp.asarray(case["nado_ntv"]),
                jnp.asarray(en.aligned(list(student.logits), case["seqs"])),
                jnp.asarray(case["seqs"]),
            )
            q_n, kl_nt = np.exp(np.asarray(log_q_n)), np.asarray(kl_nt)
            # 1. Π_t q(y_t|y_<t) = p(y)·C(y)/R(x) for every sequence (−inf rows where R = 0)
            np.testing.assert_allclose(q_n, qs, rtol=1e-10, atol=1e-15)
            assert abs(q_n.sum() - 1) < 1e-12 and not np.any(np.isnan(kl_nt))
            if hard:
                assert np.all(q_n[case["c_n"] == 0] == 0)
            # 2. Chain rule: KL_t depends only on y_<t, so weighting full sequences by q*(y)
            # is Σ_t E_{y_<t ~ q*} KL_t, which must equal the brute-force sequence KL.
            log_student = student.sequence_log_probs()[tuple(case["seqs"].T)]
            brute = np.sum(qs[support] * (np.log(qs[support]) - log_student[support]))
            chain = np.sum(qs * kl_nt.sum(-1))
            np.testing.assert_allclose(chain, brute, rtol=1e-9, atol=1e-12)
            if student is case["lm"]:
                # 3. KL(q*‖p) = E_q*[log C] − log R(x)  (= −log R(x) for a hard oracle)
                log_c = np.log(case["c_n"][support])
                identity = np.sum(qs[support] * log_c) - np.log(case["rates"][0])
                np.testing.assert_allclose(chain, identity, rtol=1e-9, atol=1e-12)
                if hard:
                    np.testing.assert_allclose(chain, -np.log(case["rates"][0]), rtol=1e-9)
            else:
                assert chain > brute * 0 + 1e-3  # a different student is genuinely far


@pytest.mark.parametrize(("vocab", "length", "hard"), CASES)
def test_consistency_is_zero_at_exact_rates(vocab, length, hard):
    case = make_case(vocab, length, hard)
    mask = jnp.ones(case["seqs"].shape, bool)
    # s/r is undefined where the exact R is 0, which a hard oracle has
    kinds = tuple(kr for kr in KINDS if not (hard and kr[0] == "ratio"))
    with jax.enable_x64(True):
        regs = consistency_all_kinds(
            jnp.asarray(case["nado_ntv"]),
            jnp.asarray(case["base_ntv"]),
            jnp.asarray(case["seqs"]),
            mask,
            kinds,
        )
    for (kind, reverse), reg in zip(kinds, regs):
        assert reg.shape == case["seqs"].shape
        assert not np.any(np.isnan(np.asarray(reg))), kind
        np.testing.assert_allclose(reg, 0.0, atol=1e-12, err_msg=f"{kind} reverse={reverse}")


def test_consistency_is_positive_away_from_exact_rates():
    case = make_case(3, 4, hard=False)
    # perturb the *table*, so every sequence sharing a prefix sees the same logits
    tables = [
        t + case["rng"].normal(0, 0.5, size=t.shape) for t in en.exact_nado_logits(case["rates"])
    ]
    seqs = jnp.asarray(case["seqs"])
    mask = jnp.ones(seqs.shape, bool)
    with jax.enable_x64(True):
        noisy, base = jnp.asarray(en.aligned(tables, case["seqs"])), jnp.asarray(case["base_ntv"])
        r = jax.nn.sigmoid(losses.select_logits(noisy, seqs))
        s = jnp.exp(losses.one_step_expectation(base, noisy)[0])
        gap = np.abs(np.asarray(r[:, :-1] - s[:, 1:]))
        assert gap.max() > 1e-2
        regs = consistency_all_kinds(noisy, base, seqs, mask, KINDS)
        grads = consistency_grads_all_kinds(noisy, base, seqs, mask, KINDS)
        for (kind, _), reg, (g_nado, g_base) in zip(KINDS, regs, grads):
            reg = np.asarray(reg)
            assert np.all(reg[:, :-1][gap > 1e-9] > 0), kind
            assert np.all(reg[:, -1] == 0)
            assert np.all(np.isfinite(np.asarray(g_nado))) and float(jnp.abs(g_nado).max()) > 0
            assert float(jnp.abs(g_base).max()) == 0  # the base LM is frozen


def test_consistency_respects_mask():
    case = make_case(4, 3, hard=False)
    tables = [t + 0.7 for t in en.exact_nado_logits(case["rates"])]
    mask = np.ones(case["seqs"].shape, bool)
    mask[:, 2] = False  # the third target is not generated (e.g. after EOS)
    (reg,) = consistency_all_kinds(
        jnp.asarray(en.aligned(tables, case["seqs"]), jnp.float32),
        jnp.asarray(case["base_ntv"], jnp.float32),
        jnp.asarray(case["seqs"]),
        jnp.asarray(mask),
        (("kl", False),),
    )
    assert np.all(np.asarray(reg[:, 1:]) == 0) and np.all(np.asarray(reg[:, 0]) > 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        losses.nado_consistency(reg[..., None], reg[..., None], case["seqs"], mask, kind="l1")


@pytest.mark.parametrize(("vocab", "length"), [(4, 3), (3, 4)])
def test_population_bce_is_stationary_at_exact_rates(vocab, length):
    """Σ_y p(y) Σ_t BCE(h(y_≤t)[y_t+1], C(y)) has zero gradient w.r.t. the table at exact R."""
    case = make_case(vocab, length, hard=False)
    seqs = jnp.asarray(case["seqs"])
    mask = jnp.ones(seqs.shape, bool)
    with jax.enable_x64(True):
        p_n = jnp.exp(jnp.asarray(case["log_p_n"]))
        labels = jnp.asarray(case["c_n"])

        @jax.jit
        @jax.value_and_grad
        def population_loss(tables):
            n = seqs.shape[0]
            h_ntv = jnp.stack(
                [
                    jnp.broadcast_to(tables[t][tuple(seqs[:, :t].T)], (n, vocab))
                    for t in range(length)
                ],
                axis=1,
            )
            return jnp.sum(p_n[:, None] * losses.nado_bce(h_ntv, seqs, labels, mask))

        exact = [jnp.asarray(t) for t in en.exact_nado_logits(case["rates"])]
        loss_exact, grads = population_loss(exact)
        assert max(float(jnp.abs(g).max()) for g in grads) < 1e-12
        loss_shifted, grads = population_loss([t + 0.3 for t in exact])
        assert max(float(jnp.abs(g).max()) for g in grads) > 1e-3
        assert loss_shifted > loss_exact
