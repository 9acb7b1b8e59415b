"""The sampling loop on a tiny pure-JAX toy LM (tests/_toy_lm.py).

References are independent of the sampler: a naive Python loop of full (cache-free)
forwards, teacher-forced forwards, enumerated sequence distributions and chi-square tests.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from scipy import stats

from jaxdetox.sampling import Sampler, SamplingConfig, sample_prompts, warp_logits
from tests._toy_lm import init_toy_params, toy_forward, toy_model

VOCAB = 11
PROMPTS = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3], [5], [8, 9, 7, 9, 3]]


@pytest.fixture(scope="module")
def params():
    return init_toy_params(jax.random.key(0), VOCAB)


@pytest.fixture(scope="module")
def sampler():
    return Sampler(toy_model())


_forward = jax.jit(toy_forward)


def _naive_greedy(params, prompt, steps, width=16):
    """One cache-free forward per token; right padding (segment 0) keeps one compiled shape."""
    seq = list(prompt)
    for _ in range(steps):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, : len(seq)] = seq
        segs = (np.arange(width) < len(seq)).astype(np.int32)[None]
        logits = _forward(params, jnp.asarray(tokens), jnp.asarray(segs))[0, len(seq) - 1]
        seq.append(int(jnp.argmax(logits)))
    return seq[len(prompt) :]


def _teacher_forced(params, prompts, out, k):
    """Left-padded prompt + completion rows, and logits predicting every completion token."""
    rows = [p for p in prompts for _ in range(k)]
    width = max(map(len, rows)) + out.tokens.shape[1]
    tokens = np.zeros((len(rows), width), np.int32)
    segs = np.zeros_like(tokens)
    for r, prompt in enumerate(rows):
        n, m = len(prompt), int(out.lengths[r])
        full = list(prompt) + list(np.asarray(out.tokens[r, :m]))
        start = width - out.tokens.shape[1] - n
        tokens[r, start : start + n + m] = full
        segs[r, start : start + n + m] = 1
    logits = np.asarray(_forward(params, jnp.asarray(tokens), jnp.asarray(segs)))
    # Logits at column c predict column c + 1; completion token j sits at width - T + j.
    first = width - out.tokens.shape[1]
    return logits[:, first - 1 : width - 1]


def test_greedy_matches_naive_loop_on_left_padded_batch(sampler, params):
    config = SamplingConfig(max_new_tokens=6, temperature=0.0, prompt_bucket=8)
    out = sampler.sample(params, PROMPTS, config)
    for row, prompt in enumerate(PROMPTS):
        assert list(np.asarray(out.tokens[row])) == _naive_greedy(params, prompt, 6)
    assert np.asarray(out.lengths).tolist() == [6] * len(PROMPTS)
    np.testing.assert_array_equal(out.logprobs, 0.0)  # greedy: a point mass


# One compiled spec (8 new tokens, top-k 6, top-p on, 3 samples) shared by several tests:
# temperature, top-p, seed and stop tokens are runtime values.
SHARED = SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=6, top_p=0.9, num_samples=3)


def test_logprobs_equal_teacher_forced_forward(sampler, params):
    config = dataclasses.replace(SHARED, seed=7, eos_token_ids=(2,))
    out = jax.tree.map(np.asarray, sampler.sample(params, PROMPTS, config))
    logits = _teacher_forced(params, PROMPTS, out, 3)
    mask = np.asarray(out.mask)
    tok = out.tokens[..., None]
    model_lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), tok, -1)[..., 0]
    warped = warp_logits(jnp.asarray(logits), temperature=0.8, top_k=6, top_p=0.9)
    sample_lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(warped)), tok, -1)[..., 0]
    np.testing.assert_allclose(out.model_logprobs[mask], model_lp[mask], atol=2e-5)
    np.testing.assert_allclose(out.logprobs[mask], sample_lp[mask], atol=2e-5)
    assert np.isfinite(out.logprobs).all()
    np.testing.assert_array_equal(out.prompt_index, np.repeat(np.arange(len(PROMPTS)), 3))


def test_stop_tokens_pad_the_rest(params):
    sampler = Sampler(toy_model())  # its own, to count its compiles
    sampler.sample(params, PROMPTS, dataclasses.replace(SHARED, seed=7, eos_token_ids=(2,)))
    eos = (2, 7)
    config = dataclasses.replace(
        SHARED, temperature=1.5, top_p=0.97, eos_token_ids=eos, pad_token_id=10
    )
    out = jax.tree.map(np.asarray, sampler.sample(params, PROMPTS, config))
    assert sampler.compile_count == 1  # runtime values only: the log-prob test's executable
    saw_stop = 0
    for row in range(out.tokens.shape[0]):
        toks = list(out.tokens[row])
        stops = [i for i, t in enumerate(toks) if t in eos]
        length = stops[0] + 1 if stops else 8
        saw_stop += bool(stops)
        assert out.lengths[row] == length
        assert all(t == 10 for t in toks[length:])
        assert (out.logprobs[row, length:] == 0).all() and (
            out.model_logprobs[row, length:] == 0
        ).all()
    assert 0 < saw_stop < out.tokens.shape[0]


def _chi_square_pvalue(counts, probs, min_expected=5.0):
    """Pearson chi-square p-value, pooling categories with small expected counts."""
    expected = probs * counts.sum()
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


@pytest.mark.slow
def test_first_token_frequencies_chi_square(sampler, params):
    n = 4000
    config = SamplingConfig(max_new_tokens=1, temperature=0.7, top_k=8, num_samples=n, seed=3)
    prompt = [[4, 2, 6]]
    out = sampler.sample(params, prompt, config)
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=VOCAB)
    logits = _forward(params, jnp.asarray(prompt), jnp.ones((1, 3), jnp.int32))[0, -1]
    probs = np.asarray(jax.nn.softmax(warp_logits(logits[None], temperature=0.7, top_k=8)))[0]
    assert counts[probs == 0].sum() == 0  # nothing outside the top-k
    assert _chi_square_pvalue(counts, probs) > 1e-3
    # The test has power: the untempered distribution is rejected.
    assert _chi_square_pvalue(counts, np.asarray(jax.nn.softmax(logits))) < 1e-6


def _enumerated_teacher(base_params, nado_params, prompt, steps, alpha):
    """q(y) for every completion y of length `steps`, from cache-free forwards."""
    seqs = list(itertools.product(range(VOCAB_SMALL), repeat=steps))
    full = jnp.asarray([list(prompt) + list(seq) for seq in seqs], jnp.int32)
    ones = jnp.ones_like(full)
    base_all = np.asarray(_forward(base_params, full, ones), np.float64)
    nado_all = np.asarray(_forward(nado_params, full, ones), np.float64)
    probs = {}
    for seq, base, nado in zip(seqs, base_all, nado_all):
        logq = 0.0
        for t, tok in enumerate(seq):
            col = len(prompt) - 1 + t
            base_lp = base[col] - np.logaddexp.reduce(base[col])
            guided = base_lp - alpha * np.logaddexp(0.0, -nado[col])  # + alpha*log_sigmoid
            logq += guided[tok] - np.logaddexp.reduce(guided)
        probs[seq] = np.exp(logq)
    return probs


VOCAB_SMALL = 4


@pytest.mark.slow
def test_guided_decoding_samples_the_enumerated_teacher():
    base = init_toy_params(jax.random.key(1), VOCAB_SMALL)
    nado = jax.tree.map(lambda x: 2.0 * x, init_toy_params(jax.random.key(2), VOCAB_SMALL))
    prompt, steps, alpha, n = [1, 3], 3, 1.5, 6000
    guided = Sampler(toy_model(), toy_model())
    config = SamplingConfig(max_new_tokens=steps, temperature=1.0, num_samples=n, alpha=alpha)
    out = jax.tree.map(np.asarray, guided.sample(base, [prompt], config, nado_params=nado))
    teacher = _enumerated_teacher(base, nado, prompt, steps, alpha)
    seqs = list(teacher)
    index = {s: i for i, s in enumerate(seqs)}
    counts = np.bincount([index[tuple(r)] for r in out.tokens], minlength=len(seqs))
    probs = np.array([teacher[s] for s in seqs])
    np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-9)
    assert _chi_square_pvalue(counts, probs) > 1e-3
    # Power: the base LM's own distribution differs enough to be rejected.
    base_only = _enumerated_teacher(base, nado, prompt, steps, 0.0)
    assert _chi_square_pvalue(counts, np.array([base_only[s] for s in seqs])) < 1e-6
    # Returned log-probs: the sequence log q (temperature 1 = the teacher itself) and base.
    seq_logq = out.model_logprobs.sum(1)
    np.testing.assert_allclose(
        seq_logq, np.log(probs[[index[tuple(r)] for r in out.tokens]]), atol=1e-4
    )
    np.testing.assert_allclose(out.logprobs, out.model_logprobs, atol=1e-5)
    seq_logp = out.base_logprobs.sum(1)
    np.testing.assert_allclose(
        seq_logp, np.log([base_only[tuple(r)] for r in out.tokens]), atol=1e-4
    )


def test_seed_reproducible_and_batch_layout_invariant(sampler, params, capsys):
    config = dataclasses.replace(SHARED, temperature=1.0, top_p=0.95, seed=5)
    a = sample_prompts(sampler, params, PROMPTS, config, batch_size=4, progress=True)
    assert "tok_s=" in capsys.readouterr().err  # the progress bar reports tokens/s
    b = sample_prompts(sampler, params, PROMPTS, config, batch_size=2, progress=False)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    np.testing.assert_array_equal(a.prompt_index, np.repeat(np.arange(4), 3))
    # Samples for one prompt differ from each other, and another seed changes them.
    assert (a.tokens[0::3] != a.tokens[1::3]).any()
    c = sample_prompts(
        sampler, params, PROMPTS, dataclasses.replace(config, seed=6), batch_size=4, progress=False
    )
    assert (c.tokens != a.tokens).any()
    # Row order matches a direct call: sample_prompts sorts by length internally.
    direct = jax.tree.map(np.asarray, sampler.sample(params, PROMPTS, config))
    np.testing.assert_array_equal(direct.tokens, a.tokens)


@pytest.mark.slow
def test_compiles_once_per_bucket(params):
    sampler = Sampler(toy_model())
    config = SamplingConfig(max_new_tokens=3, temperature=0.9, top_p=0.9, prompt_bucket=16)
    sampler.sample(params, [[1, 2, 3]], config)
    sampler.sample(params, [list(range(1, 10))], config)  # same bucket (16)
    fresh = jax.tree.map(lambda x: x + 0.1, params)  # new parameter values, same shapes
    sampler.sample(
        fresh, [[4]], SamplingConfig(**{**config.__dict__, "temperature": 0.5, "seed": 9})
    )
    assert sampler.compile_count == 1
    sampler.sample(params, [list(range(1, 11)) * 2], config)  # 20 tokens -> bucket 32
    assert sampler.compile_count == 2


@pytest.mark.slow
def test_sharded_over_8_devices_matches_one_device(params):
    assert jax.device_count() >= 8
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    config = SamplingConfig(max_new_tokens=5, temperature=1.0, top_k=5, num_samples=2, seed=11)
    prompts = PROMPTS * 2
    single = jax.tree.map(np.asarray, Sampler(toy_model()).sample(params, prompts, config))
    sharded_sampler = Sampler(toy_model(), mesh=mesh, batch_axes="data")
    sharded = sharded_sampler.sample(params, prompts, config)
    assert len(sharded.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded.tokens), single.tokens)
    np.testing.assert_allclose(np.asarray(sharded.logprobs), single.logprobs, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="cache_dtype"):
        SamplingConfig(cache_dtype="int8")
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
