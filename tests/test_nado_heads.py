"""NADO heads (`nado.head`: linear | factored): neutral start, the formula each implements,
save/load, the chunked NADO loss against its full-logit form, the frozen embedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdetox import losses, sharding
from jaxdetox.losses import reference
from jaxdetox.models import ModelConfig, random_init
from jaxdetox.models.nado import (
    NadoConfig,
    init_nado,
    load_nado,
    nado_logits,
    save_nado,
    with_uniform_bias,
)
from jaxdetox.train.optimizer import OptimizerConfig
from jaxdetox.train.setup import make_training
from jaxdetox.train.state import split_params, to_nnx_state
from tests._tiny import NADO_TEST_LM, random_tokens

LM_CONFIG = ModelConfig(**NADO_TEST_LM)
HEADS = [("linear", 0), ("factored", 0), ("factored", 4)]


@pytest.fixture(scope="module")
def lm():
    return random_init(LM_CONFIG, seed=1)


_tokens = random_tokens


def _nado(lm, variant, head, rank, seed=0):
    config = NadoConfig.for_lm(LM_CONFIG, variant, num_layers=1, head=head, head_rank=rank)
    return init_nado(config, seed, lm_model=lm.model)


def _perturb(nado, seed=0):
    """Random values in every trainable head tensor: a head that has learnt something."""
    rng = np.random.default_rng(seed)
    for name, var in nnx.to_flat_state(nnx.state(nado.head, nnx.Param)):
        if name[-1] != "embedding":
            var[...] = jnp.asarray(rng.standard_normal(var.shape), var.dtype) * 0.3


def _logits(nado, lm, tokens):
    h_lm, _ = lm.model.hidden_states(tokens)
    return nado_logits(nado, tokens, lm_hidden_btd=h_lm)[0], h_lm


@pytest.mark.parametrize("variant", ["separate", "shared"])
@pytest.mark.parametrize("head,rank", HEADS)
def test_zero_information_start_is_neutral(lm, variant, head, rank):
    """Trainable matrices at zero: every R is σ(b); a uniform bias leaves q = the reference."""
    nado = _nado(lm, variant, head, rank)
    _, abstract, params = split_params(nado)
    nado = nnx.merge(
        nnx.split(nado, nnx.Param)[0], to_nnx_state(abstract, with_uniform_bias(params, 0.8))
    )
    tokens = _tokens()
    h, _ = _logits(nado, lm, tokens)
    np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(h)), 0.8, rtol=1e-6)
    base = lm.logits(tokens)
    q = losses.guided_log_probs(jnp.asarray(base), h, alpha=2.0)
    np.testing.assert_allclose(np.asarray(q), np.asarray(jax.nn.log_softmax(base)), atol=1e-5)


@pytest.mark.parametrize("rank", [0, 4])
def test_factored_head_formula(lm, rank):
    """h_φ[v] = a·h + E_v·(W h + u) + b_v with E the LM's output embedding (docs/method.md)."""
    nado = _nado(lm, "shared", "factored", rank)
    _perturb(nado, seed=rank)
    tokens = _tokens()
    got, h_lm = _logits(nado, lm, tokens)
    hd = nado.head
    w = hd.proj[...] if rank == 0 else hd.up[...] @ hd.down[...]
    e = np.asarray(lm.model.unembed_weights()[0])
    h = np.asarray(h_lm)
    want = (
        h @ np.asarray(hd.value[...])[:, None]
        + (h @ np.asarray(w).T + np.asarray(hd.shift[...])) @ e.T
        + np.asarray(hd.b[...])
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(hd.embedding[...])[:, :-1], e)


def test_factored_head_needs_the_output_embedding():
    config = NadoConfig.for_lm(LM_CONFIG, "separate", num_layers=1, head="factored")
    with pytest.raises(ValueError, match="output embedding"):
        init_nado(config)
    with pytest.raises(ValueError, match="head_rank"):
        NadoConfig.for_lm(LM_CONFIG, "shared", head="factored", head_rank=33)


@pytest.mark.parametrize("variant", ["separate", "shared"])
@pytest.mark.parametrize("head,rank", HEADS)
def test_save_load_round_trip(tmp_path, lm, variant, head, rank):
    nado = _nado(lm, variant, head, rank)
    _perturb(nado)
    save_nado(nado, tmp_path)
    loaded = load_nado(tmp_path, mesh=sharding.make_mesh((1, 4, 2)))
    assert loaded.config == nado.config
    tokens = _tokens()
    a, h_lm = _logits(nado, lm, tokens)
    b, _ = nado_logits(loaded, tokens, lm_hidden_btd=h_lm)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("head,rank", HEADS)
def test_chunked_nado_loss_equals_full_logit_form(lm, head, rank):
    """The row-gather BCE + chunked consistency of `nado_losses` equal the full-logit forms,
    values and gradients in every head parameter."""
    nado = _nado(lm, "separate", head, rank)
    _perturb(nado, seed=3)
    graph, params = nnx.split(nado, nnx.Param)
    tokens = _tokens(3, 9, seed=2)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.asarray(np.random.default_rng(0).random((3, 9)) > 0.3)
    labels = jnp.asarray([0.9, 0.2, 0.6])
    h_base, _ = lm.model.hidden_states(tokens)
    base_head = lm.model.unembed_weights()

    def loss(p, form):
        model = nnx.merge(graph, p)
        f, _ = model.hidden_states(tokens)
        out = form(f, model.unembed_weights(), h_base, base_head, targets, labels, mask,
                   consistency="kl")  # fmt: skip
        return jnp.sum(out.bce_bt) + jnp.sum(out.consistency_bt)

    (a, ga), (b, gb) = (
        jax.value_and_grad(loss)(params, form)
        for form in (losses.nado_losses, reference.nado_losses_naive)
    )
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    for (path, x), (_, y) in zip(nnx.to_flat_state(ga), nnx.to_flat_state(gb)):
        np.testing.assert_allclose(
            np.asarray(x[...]), np.asarray(y[...]), atol=1e-5, err_msg=str(path)
        )


def test_factored_embedding_never_trains(lm):
    """The copy of the LM's output embedding is frozen whatever `trainable` says: no Adam
    moments for it (multi_transform's set_to_zero) and no gradient."""
    nado = _nado(lm, "separate", "factored", 0)
    training = make_training(
        lm.model, nado, sharding.make_mesh((-1, 1, 1)), lm_optimizer=None,
        nado_optimizer=OptimizerConfig(learning_rate=1e-2, trainable=(r"^head\.",)),
    )  # fmt: skip
    mask = training.models.nado_trainable
    assert mask["head"]["embedding"] is False and mask["head"]["proj"] is True
    assert mask["body"]["layers"]["mlp"]["up"] is False


def test_head_parameter_group_has_its_own_learning_rate_and_the_frozen_leaf_none():
    """`train_nado.head_learning_rate` puts `head.*` in its own AdamW group: Adam's first
    step moves each leaf by ~its group's learning rate (|update| = lr for a nonzero grad)."""
    import optax

    from jaxdetox.train.optimizer import make_optimizer

    params = {
        "body": {"w": jnp.ones((3,))},
        "head": {"w": jnp.ones((3,)), "embedding": jnp.ones(2)},
    }
    config = OptimizerConfig(
        learning_rate=1e-3, max_grad_norm=None, frozen=(r"^head\.embedding$",),
        groups=((r"^head\.", 1e-1, 0.0),),
    )  # fmt: skip
    opt, _ = make_optimizer(config, 10, params)
    grads = jax.tree.map(lambda x: 0.5 * jnp.ones_like(x), params)
    updates, _ = opt.update(grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(1 - new["body"]["w"]), 1e-3, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(1 - new["head"]["w"]), 1e-1, rtol=1e-3)
    np.testing.assert_array_equal(np.asarray(new["head"]["embedding"]), 1.0)
    with pytest.raises(ValueError, match="optimizer.groups"):
        OptimizerConfig(groups=(("[", 1e-3, 0.0),))
