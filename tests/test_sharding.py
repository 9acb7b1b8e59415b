"""Mesh construction, logical->mesh rules, and sharded forward == single-device forward."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_models_helpers import left_padded_batch, make_hf_model

from jaxdetox import sharding
from jaxdetox.models import ModelConfig, build_model, load_pretrained


def test_make_mesh_fills_and_validates():
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(sharding.make_mesh((2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh({"tensor": 2, "data": -1}).shape)["data"] == 4
    one = sharding.make_mesh(devices=jax.devices()[:1])
    assert dict(one.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in one.axis_types)
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.make_mesh((3, 2, 2))
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.make_mesh({"model": 2})


def test_logical_to_spec_is_shape_aware():
    mesh = sharding.make_mesh((2, 2, 2))
    spec = sharding.logical_to_spec
    assert spec(("layers", "embed", "mlp"), (3, 8, 16), mesh) == P(None, "fsdp", "tensor")
    assert spec(("batch", "length", "embed"), (8, 5, 16), mesh) == P(("data", "fsdp"), None, None)
    # batch 2 only takes `data`; embed may then use fsdp.
    assert spec(("batch", "length", "embed"), (2, 5, 16), mesh) == P("data", None, "fsdp")
    assert spec(("vocab", "embed"), (95, 16), mesh) == P(None, "fsdp")  # 95 not divisible
    assert spec(("vocab", "embed")) == P("tensor", "fsdp")  # no mesh: the rule itself


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_hf_model("llama_gqa", seed=7).save_pretrained(str(d))
    return d


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_forward_equals_single_device(ckpt, shape):
    tokens, segments = left_padded_batch(np.random.default_rng(0), 8, 6, pads=[0, 2] * 4)
    single = load_pretrained(ckpt, mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    ref = np.asarray(single.logits(tokens, segment_ids=segments))

    mesh = sharding.make_mesh(shape)
    lm = load_pretrained(ckpt, mesh=mesh)
    got = lm.logits(tokens, segment_ids=segments)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)
    data, fsdp, tensor = shape
    assert len(got.sharding.device_set) == 8

    # Parameters are really split: each device holds 1/(fsdp*tensor) of the embedding and
    # the stacked q projection [L, D, N, Dh] is split on D (fsdp) and N (tensor).
    embed = lm.model.embed[...]
    assert embed.sharding.spec == P("tensor", "fsdp")  # size-1 mesh axes are harmless
    assert embed.addressable_shards[0].data.shape == (96 // tensor, 32 // fsdp)
    wq = lm.model.layers.attn.wq[...]
    assert wq.addressable_shards[0].data.shape == (2, 32 // fsdp, 4 // tensor, 8)
    assert {s.device for s in wq.addressable_shards} == set(jax.devices())


def test_build_model_on_mesh_initialises_sharded():
    config = ModelConfig(
        family="gpt2",
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=16,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        hidden_act="gelu_new",
    )
    mesh = sharding.make_mesh((1, 4, 2))
    model = build_model(config, 3, mesh=mesh)
    fc = model.layers.mlp.fc[...]
    assert fc.sharding.spec == P(None, "fsdp", "tensor")
    assert fc.addressable_shards[0].data.shape == (2, 8, 32)
    plain = build_model(config, 3)
    np.testing.assert_array_equal(np.asarray(fc), np.asarray(plain.layers.mlp.fc[...]))
