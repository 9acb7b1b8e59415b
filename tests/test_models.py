"""Logits parity with transformers PyTorch, KV-cache decode, packing and dtype policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_models_helpers import CONFIGS, hf_logits, left_padded_batch, make_hf_model

from jaxdetox.models import LanguageModel, ModelConfig, init_cache, load_pretrained, random_init
from jaxdetox.models.config import REMAT_POLICIES, UnsupportedConfigError
from jaxdetox.models.registry import abstract_model

TOL = 1e-4


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """name -> (HF torch model, our LanguageModel loaded from its save_pretrained dir)."""
    cache = {}

    def get(name):
        if name not in cache:
            hf = make_hf_model(name)
            d = tmp_path_factory.mktemp(name)
            hf.save_pretrained(str(d))
            cache[name] = (hf, load_pretrained(d))
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_parity_unpadded_and_left_padded(loaded, name):
    hf, lm = loaded(name)
    rng = np.random.default_rng(1)
    tokens, segments = left_padded_batch(rng, 3, 9, pads=[0, 3, 5])
    ours = np.asarray(lm.logits(tokens, segment_ids=segments))
    assert ours.dtype == np.float32 and ours.shape == (3, 9, lm.config.vocab_size)
    ref = hf_logits(hf, tokens, segments)
    real = segments != 0
    assert np.abs(ours - ref)[real].max() <= TOL
    # Unpadded: the default segment ids/positions must match HF's defaults.
    unpadded = rng.integers(0, lm.config.vocab_size, (3, 9)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(lm.logits(unpadded)), hf_logits(hf, unpadded), atol=TOL)


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "mistral_window"])
def test_kv_cache_decode_equals_full_forward(loaded, name):
    _, lm = loaded(name)
    tokens, segments = left_padded_batch(np.random.default_rng(2), 2, 10, pads=[0, 3])
    full = np.asarray(lm.logits(tokens, segment_ids=segments))
    model = lm.model
    step = jax.jit(lambda t, s, c: model(t, segment_ids_bt=s, cache=c))
    cache = init_cache(lm.config, batch=2, max_len=12)
    prefill = 6
    logits, cache = step(tokens[:, :prefill], segments[:, :prefill], cache)
    got = [np.asarray(logits)]
    for t in range(prefill, 10):
        logits, cache = step(tokens[:, t : t + 1], segments[:, t : t + 1], cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    real = segments != 0
    assert np.abs(got - full)[real].max() <= 1e-5
    assert int(cache.index) == 10
    np.testing.assert_array_equal(np.asarray(cache.segment_ids)[:, :10], segments)
    np.testing.assert_array_equal(np.asarray(cache.positions)[1, 3:10], np.arange(7))


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_packed_segments_equal_separate_documents(loaded, name):
    _, lm = loaded(name)
    rng = np.random.default_rng(3)
    a = rng.integers(0, 96, (1, 5)).astype(np.int32)
    b = rng.integers(0, 96, (1, 5)).astype(np.int32)
    packed = np.concatenate([a, b[:, :4], np.zeros((1, 1), np.int32)], axis=1)
    segments = np.array([[1] * 5 + [2] * 4 + [0]], np.int32)
    positions = np.array([list(range(5)) + list(range(4)) + [0]], np.int32)
    got = np.asarray(lm.logits(packed, segment_ids=segments, positions=positions))
    np.testing.assert_allclose(got[:, :5], np.asarray(lm.logits(a)), atol=1e-5)
    np.testing.assert_allclose(got[:, 5:9], np.asarray(lm.logits(b))[:, :4], atol=1e-5)


def test_hidden_states_and_unembed_give_logits(loaded):
    _, lm = loaded("llama_gqa")
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
    h_btd, cache = lm.model.hidden_states(jnp.asarray(tokens))
    assert cache is None and h_btd.shape == (2, 6, 32)
    w_vd, bias_v = lm.model.unembed_weights()
    assert bias_v is None and w_vd.shape == (96, 32)
    np.testing.assert_allclose(np.asarray(h_btd @ w_vd.T), np.asarray(lm.logits(tokens)), atol=1e-5)


def test_bf16_compute_smoke():
    base = ModelConfig(
        family="llama",
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        initializer_range=0.2,
    )
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
    ref = np.asarray(random_init(base, seed=0).logits(tokens))
    for param_dtype in ("float32", "bfloat16"):
        lm = random_init(base.replace(dtype="bfloat16", param_dtype=param_dtype), seed=0)
        leaf = jax.tree.leaves(lm.split()[1])[0]
        assert leaf.dtype == jnp.dtype(param_dtype)
        got = np.asarray(lm.logits(tokens))
        assert got.dtype == np.float32 and np.isfinite(got).all()
        # bf16 has ~3 significant digits: close to fp32, far from identical.
        assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()


def test_full_size_shapes_match_hf_parameter_counts():
    # Llama-3-8B and GPT-2 small, built abstractly (no memory): parameter counts match HF's.
    llama3 = {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 131072,
    }
    gpt2 = {"model_type": "gpt2", "vocab_size": 50257}
    for hf, expected in ((llama3, 8_030_261_248), (gpt2, 124_439_808)):
        model = abstract_model(ModelConfig.from_hf(hf))
        count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
        assert count == expected


@pytest.mark.parametrize("name", ["llama3_rope", "linear_rope"])
def test_rope_scaling_parity_at_large_positions(loaded, name):
    # Far positions make every frequency band matter (low bands barely turn at t < 10).
    hf, lm = loaded(name)
    tokens = np.random.default_rng(5).integers(0, 96, (1, 8)).astype(np.int32)
    positions = (np.arange(8, dtype=np.int32) * 997 + 3000)[None]
    ours = np.asarray(lm.logits(tokens, positions=positions))
    with torch.no_grad():
        ref = hf(
            torch.tensor(tokens, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        ).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=TOL)
    # The scaling is really exercised: unscaled RoPE gives different logits here.
    unscaled = lm.config.replace(rope_type="default")
    plain = LanguageModel(unscaled, nnx.merge(*_with_config(lm.model, unscaled)))
    assert np.abs(np.asarray(plain.logits(tokens, positions=positions)) - ours).max() > 1e-3


def _with_config(model, config):
    """(graphdef built for `config`, the model's state): same weights, other static config."""
    _, state = nnx.split(model)
    new = nnx.eval_shape(lambda: type(model)(config, rngs=nnx.Rngs(0)))
    return nnx.graphdef(new), state


@pytest.mark.slow
def test_remat_gradients_equal_and_compile_once(loaded):
    _, lm = loaded("gpt2")
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 96, (2, 6)), jnp.int32)

    def loss(params, graphdef):
        logits, _ = nnx.merge(graphdef, params)(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    graphdef, params = nnx.split(lm.model, nnx.Param)
    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l_plain, g_plain = value_and_grad(params, graphdef)
    # Every named policy (and the former switch, True = "full"): same loss and gradients.
    assert lm.config.replace(remat=True).remat == "full"
    assert lm.config.replace(remat=False).remat == "none"
    for policy in (True, *REMAT_POLICIES):
        remat_def, _ = _with_config(lm.model, lm.config.replace(remat=policy))
        l_remat, g_remat = value_and_grad(params, remat_def)
        np.testing.assert_allclose(float(l_remat), float(l_plain), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert float(jnp.abs(g_plain["layers"]["attn"]["wq"][...]).max()) > 0
    with pytest.raises(UnsupportedConfigError, match="'remat'"):
        lm.config.replace(remat="dots")

    from jaxdetox.lm import logits_program

    before = logits_program._cache_size()
    lm.logits(np.zeros((2, 5), np.int32))
    lm.logits(np.ones((2, 5), np.int32))
    assert logits_program._cache_size() == before + 1
