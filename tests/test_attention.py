"""Attention implementations (jaxdetox/models/attention.py): which one `auto` selects on
which platform, and the einsum reference against `jax.nn.dot_product_attention` (XLA) on
CPU, GQA shapes, with segment ids, left padding and the KV cache (prefill + decode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdetox.models import build_model, init_cache
from jaxdetox.models.attention import Platform, attend, select_attention
from jaxdetox.models.config import ModelConfig, UnsupportedConfigError
from jaxdetox.sampling import Sampler, SamplingConfig, decode_model_for

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
CPU, TPU = Platform("cpu", False), Platform("tpu", False)
GPU, GPU_NO_CUDNN = Platform("gpu", True), Platform("gpu", False)
CALL = dict(dtype=BF16, head_dim=64, q_len=128, kv_len=128, cached=False)


@pytest.mark.parametrize(
    "platform, changes, expected",
    [
        (GPU, {}, "cudnn"),  # a CUDA GPU, bf16, supported shapes: cuDNN flash
        (GPU, {"dtype": F32}, "xla"),  # cuDNN needs bf16/fp16
        (GPU, {"head_dim": 84}, "xla"),  # not a multiple of 8
        (GPU, {"head_dim": 256}, "xla"),  # above 128
        (GPU, {"q_len": 127}, "xla"),  # odd length with a mask
        (GPU, {"cached": True}, "xla"),  # prefill / decode against the KV cache
        (GPU_NO_CUDNN, {}, "xla"),  # ROCm, an old GPU or no cuDNN
        (TPU, {}, "xla"),
        (CPU, {}, "einsum"),
    ],
)
def test_auto_selects_cudnn_only_where_it_runs(platform, changes, expected):
    assert select_attention("auto", platform=platform, **{**CALL, **changes}) == expected


def test_explicit_choices_and_errors():
    for name in ("einsum", "xla"):
        for platform in (CPU, GPU, TPU):
            assert select_attention(name, platform=platform, **CALL) == name
    assert select_attention("cudnn", platform=GPU, **CALL) == "cudnn"
    with pytest.raises(ValueError, match="'cudnn' cannot run here: platform 'cpu'"):
        select_attention("cudnn", platform=CPU, **CALL)
    with pytest.raises(ValueError, match="dtype float32"):
        select_attention("cudnn", platform=GPU, **{**CALL, "dtype": F32})
    with pytest.raises(ValueError, match="expected one of"):
        select_attention("flash", platform=GPU, **CALL)
    with pytest.raises(UnsupportedConfigError, match="'attention'"):
        _config("flash")


def _config(attention, dtype="float32"):
    return ModelConfig(
        family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, intermediate_size=48, dtype=dtype, attention=attention,
    )  # fmt: skip


def _segments():
    """Row 0: two packed documents then padding; row 1: left padding then one document."""
    return jnp.asarray([[1, 1, 1, 2, 2, 2, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]], jnp.int32)


@pytest.mark.parametrize("dtype, atol", [(F32, 1e-6), (BF16, 2e-2)])
def test_attend_einsum_equals_xla_gqa_with_segments(dtype, atol):
    rng = np.random.default_rng(0)
    b, t, n, kvh, h = 2, 8, 6, 2, 16
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), dtype)
        for shape in ((b, t, n, h), (b, t, kvh, h), (b, t, kvh, h))
    )
    seg = _segments()
    slots = jnp.arange(t)
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    mask &= slots[None, None, :] <= slots[None, :, None]
    ref = attend(q, k, v, mask, "einsum")
    got = attend(q, k, v, mask, "xla")
    assert ref.dtype == got.dtype == dtype
    # Every row, padding queries included (a uniform row in both).
    np.testing.assert_allclose(np.asarray(got, F32), np.asarray(ref, F32), atol=atol)


@pytest.fixture(scope="module")
def models():
    """attention implementation -> the same tiny random GQA Llama (same weights)."""
    return {name: build_model(_config(name), 0) for name in ("einsum", "xla")}


def test_model_forward_and_gradient_agree(models):
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 64, (2, 8)), jnp.int32)
    seg = _segments()
    out = {}
    for name, model in models.items():
        graphdef, params = nnx.split(model)

        def loss(params, graphdef=graphdef):
            logits, _ = nnx.merge(graphdef, params)(tokens, segment_ids_bt=seg)
            return jnp.sum(jnp.where(seg[..., None] != 0, logits, 0.0) ** 2) / 100

        out[name] = jax.jit(jax.value_and_grad(loss))(params)
    (ref_loss, ref_grad), (loss_xla, grad_xla) = out["einsum"], out["xla"]
    np.testing.assert_allclose(float(loss_xla), float(ref_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad_xla), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_kv_cache_prefill_and_decode_agree(models):
    """Scanned stacked-cache path: a left-padded prefill, then three decode steps."""
    prompt = jnp.asarray([[0, 0, 5, 17, 33], [40, 41, 42, 43, 44]], jnp.int32)
    seg = (prompt != 0).astype(jnp.int32)
    logits, caches = {}, {}
    for name, model in models.items():
        cache = init_cache(model.config, 2, 8)
        step_logits, cache = model(prompt, segment_ids_bt=seg, cache=cache)
        steps = [step_logits[:, -1]]
        token = jnp.asarray([[7], [9]], jnp.int32)
        for _ in range(3):
            step_logits, cache = model(token, cache=cache)
            steps.append(step_logits[:, -1])
            token = jnp.argmax(steps[-1], axis=-1)[:, None].astype(jnp.int32)
        logits[name], caches[name] = np.stack(steps), cache
    np.testing.assert_allclose(logits["xla"], logits["einsum"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(caches["xla"].k, caches["einsum"].k, rtol=1e-5, atol=1e-6)


def test_sampler_decode_form_agrees(models):
    """The sampler's decode form (heads-major per-layer cache): same tokens and log-probs."""
    prompts = [[5, 17, 33, 2, 9], [40, 41, 42], [7]]
    config = SamplingConfig(max_new_tokens=5, temperature=0.9, top_k=20, num_samples=2, seed=1)
    outs = {}
    for name, model in models.items():
        decode_model, params = decode_model_for(model)
        outs[name] = jax.tree.map(np.asarray, Sampler(decode_model).sample(params, prompts, config))
    np.testing.assert_array_equal(outs["xla"].tokens, outs["einsum"].tokens)
    np.testing.assert_allclose(outs["xla"].model_logprobs, outs["einsum"].model_logprobs, atol=1e-5)
