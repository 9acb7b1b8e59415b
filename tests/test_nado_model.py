"""The NADO auxiliary model: both variants, zero-init head, init from the LM, cache, save/load."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdetox import sharding
from jaxdetox.models import CheckpointError, ModelConfig, random_init
from jaxdetox.models.nado import NadoConfig, init_nado, load_nado, nado_logits, save_nado
from tests._tiny import NADO_TEST_LM, random_tokens

LM_CONFIG = ModelConfig(**NADO_TEST_LM)


@pytest.fixture(scope="module")
def lm():
    return random_init(LM_CONFIG, seed=1)


_tokens = random_tokens


@pytest.mark.parametrize("variant", ["separate", "shared"])
def test_zero_init_head_gives_half_everywhere(lm, variant):
    nado = init_nado(NadoConfig.for_lm(LM_CONFIG, variant, num_layers=1), seed=0)
    tokens = _tokens()
    h_btd, _ = lm.model.hidden_states(tokens)
    logits, cache = nado(tokens, lm_hidden_btd=h_btd)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 7, LM_CONFIG.vocab_size)
    np.testing.assert_array_equal(np.asarray(jax.nn.sigmoid(logits)), 0.5)
    assert cache is None
    w_vd, b_v = nado.unembed_weights()
    assert w_vd.shape == (48, 32) and b_v.shape == (48,)


def test_separate_body_from_lm_layers(lm):
    # All layers copied: the body's hidden states are the LM's exactly.
    full = init_nado(NadoConfig.for_lm(LM_CONFIG, "separate"), lm_model=lm.model)
    tokens = _tokens()
    np.testing.assert_array_equal(
        np.asarray(full.hidden_states(tokens)[0]), np.asarray(lm.model.hidden_states(tokens)[0])
    )
    # First n layers: the stacked parameters are the LM's leading slices.
    nado = init_nado(NadoConfig.for_lm(LM_CONFIG, "separate", num_layers=2), lm_model=lm.model)
    assert nado.config.body.num_layers == 2
    np.testing.assert_array_equal(
        np.asarray(nado.body.layers.mlp.up[...]), np.asarray(lm.model.layers.mlp.up[...][:2])
    )
    np.testing.assert_array_equal(np.asarray(nado.body.embed[...]), np.asarray(lm.model.embed[...]))
    # Randomly initialised body differs from the LM.
    rand = init_nado(NadoConfig.for_lm(LM_CONFIG, "separate", num_layers=2), seed=3)
    assert not np.allclose(np.asarray(rand.body.embed[...]), np.asarray(lm.model.embed[...]))


def test_shared_head_is_a_linear_map_of_lm_hidden(lm):
    nado = init_nado(NadoConfig.for_lm(LM_CONFIG, "shared", head_init="normal"), seed=2)
    nado.head.w[...] = lm.model.unembed_weights()[0]  # head == LM unembedding -> LM logits
    tokens = _tokens()
    h_btd, _ = lm.model.hidden_states(tokens)
    got, _ = nado_logits(nado, tokens, lm_hidden_btd=h_btd)
    np.testing.assert_allclose(np.asarray(got), np.asarray(lm.logits(tokens)), atol=1e-5)
    with pytest.raises(ValueError, match="lm_hidden_btd"):
        nado(tokens)


def test_separate_nado_cache_decode_equals_full(lm):
    nado = init_nado(
        NadoConfig.for_lm(LM_CONFIG, "separate", num_layers=2, head_init="normal"),
        lm_model=lm.model,
    )
    tokens = _tokens(2, 8, seed=4)
    full, _ = nado(tokens)
    graphdef, state = nnx.split(nado)

    @jax.jit
    def step(state, t, cache):
        return nnx.merge(graphdef, state)(t, cache=cache)

    cache = nado.init_cache(batch=2, max_len=8)
    first, cache = step(state, tokens[:, :5], cache)
    rest = []
    for t in range(5, 8):
        logits, cache = step(state, tokens[:, t : t + 1], cache)
        rest.append(logits)
    got = jnp.concatenate([first, *rest], axis=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-5)


@pytest.mark.parametrize("variant", ["separate", "shared"])
def test_save_load_round_trip_on_its_own(tmp_path, lm, variant):
    nado = init_nado(
        NadoConfig.for_lm(LM_CONFIG, variant, num_layers=1, head_init="normal"), seed=5
    )
    save_nado(nado, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nado.safetensors", "nado_config.json"]
    mesh = sharding.make_mesh((1, 4, 2))
    loaded = load_nado(tmp_path, mesh=mesh)
    assert loaded.config == nado.config
    assert loaded.head.w[...].addressable_shards[0].data.shape == (48 // 2, 32 // 4)
    tokens = _tokens()
    h_btd, _ = lm.model.hidden_states(tokens)
    a, _ = nado(tokens, lm_hidden_btd=h_btd)
    with jax.set_mesh(mesh):
        b, _ = jax.jit(lambda m, t, h: m(t, lm_hidden_btd=h))(loaded, tokens, h_btd)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nado_config.json"):
        load_nado(tmp_path)
    nado = init_nado(NadoConfig.for_lm(LM_CONFIG, "shared"))
    save_nado(nado, tmp_path)
    (tmp_path / "nado.safetensors").write_bytes(b"garbage!")
    with pytest.raises(CheckpointError, match="nado.safetensors"):
        load_nado(tmp_path)
    with pytest.raises(ValueError, match="variant"):
        NadoConfig("both", LM_CONFIG)
