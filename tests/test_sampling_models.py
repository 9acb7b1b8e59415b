"""The sampler on the real model families vs transformers PyTorch `generate` and forwards.

Tiny random HF models (GPT-2, Llama with GQA) are built locally, saved with
`save_pretrained` and loaded with `jaxdetox.models.load_pretrained`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxdetox import losses, sharding
from jaxdetox.lm import lm_sampler
from jaxdetox.models import load_pretrained
from jaxdetox.models.nado import NadoConfig, init_nado
from jaxdetox.sampling import Sampler, SamplingConfig, decode_model_for, warp_logits

VOCAB = 96
PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42, 43, 44, 45, 46, 47, 48], [7, 8, 90]]
HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_head=4, n_layer=2, n_positions=64, eos_token_id=1
    ),
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_hidden_layers=2,
        max_position_embeddings=64,
        eos_token_id=1,
    ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (HF torch model, our LanguageModel loaded from its save_pretrained dir)."""
    built = {}

    def get(name, seed=0, dtype="float32"):
        """`dtype`: our model's compute dtype (float32 master weights either way)."""
        if (name, seed, dtype) not in built:
            if (name, seed, "float32") not in built:
                torch.manual_seed(seed)
                hf = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name]()).eval()
                with torch.no_grad():  # larger weights than HF's init: sharper, less tied logits
                    for p in hf.parameters():
                        p.mul_(4.0) if p.ndim > 1 else p.add_(0.1 * torch.randn_like(p))
                directory = tmp_path_factory.mktemp(f"{name}_{seed}")
                hf.save_pretrained(str(directory))
                built[(name, seed, "float32")] = (hf, load_pretrained(directory), directory)
            hf, _, directory = built[(name, seed, "float32")]
            built[(name, seed, dtype)] = (hf, load_pretrained(directory, dtype=dtype), directory)
        return built[(name, seed, dtype)][:2]

    return get


def _hf_greedy(hf, prompts, new, eos, pad):
    """transformers greedy generate on a left-padded batch; new tokens padded to `new`."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    gen = out[:, width:].numpy()
    return np.pad(gen, ((0, 0), (0, new - gen.shape[1])), constant_values=pad)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_greedy_matches_transformers_left_padded_with_eos(models, name):
    hf, lm = models(name)
    sampler, params, _ = lm_sampler(lm)
    no_stop = _hf_greedy(hf, PROMPTS, 8, eos=None, pad=0)
    out = sampler.sample(params, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0.0))
    np.testing.assert_array_equal(np.asarray(out.tokens), no_stop)
    # Stop at a token that row 0 emits mid-way; finished rows are padded like HF's.
    eos = int(no_stop[0, 3])
    ref = _hf_greedy(hf, PROMPTS, 8, eos=eos, pad=0)
    config = SamplingConfig(max_new_tokens=8, temperature=0.0, eos_token_ids=(eos,))
    out = sampler.sample(params, PROMPTS, config)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert int(out.lengths[0]) == 1 + list(no_stop[0]).index(eos)


def test_lm_generate_matches_transformers_unpadded(models):
    hf, lm = models("gpt2")
    tokens = np.array([[3, 4, 5, 6], [60, 61, 62, 63]], np.int32)
    ours = np.asarray(lm.generate(tokens, max_new_tokens=6))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(tokens, dtype=torch.long), do_sample=False, max_new_tokens=6)
    ref = ref.numpy()
    assert ours.shape == (2, 10) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)


def _completion_logits(lm, prompts, out, k):
    """Teacher-forced logits predicting each completion token (left-padded prompt + completion)."""
    tokens, segs, first = _completion_rows(prompts, out, k)
    logits = np.asarray(lm.logits(tokens, segment_ids=segs))
    return logits[:, first - 1 : tokens.shape[1] - 1]


def _completion_rows(prompts, out, k):
    """Left-padded prompt + completion rows, segment ids, and the first completion column."""
    rows = [p for p in prompts for _ in range(k)]
    new = out.tokens.shape[1]
    width = max(map(len, rows)) + new
    tokens = np.zeros((len(rows), width), np.int32)
    segs = np.zeros_like(tokens)
    for r, prompt in enumerate(rows):
        m = int(out.lengths[r])
        full = list(prompt) + list(out.tokens[r, :m])
        start = width - new - len(prompt)
        tokens[r, start : start + len(full)] = full
        segs[r, start : start + len(full)] = 1
    return tokens, segs, width - new


def _take(logp, tokens):
    return np.take_along_axis(np.asarray(logp), tokens[..., None], -1)[..., 0]


# Sampler vs teacher forcing, per compute dtype: float32 agrees to rounding; in bfloat16 the
# decode (one token at a time against the cache) and the teacher-forced forward (every
# position at once) round differently: log-probs differed by at most 0.018 nat here (0.002
# to 0.018 across these tests), so 0.05 (log-probs are O(1)-O(10); a wrong cache slot or
# mask is off by far more).
TEACHER_FORCING_ATOL = {"float32": 1e-4, "bfloat16": 0.05}
DTYPES = sorted(TEACHER_FORCING_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_equal_teacher_forced_forward(models, dtype):
    _, lm = models("llama_gqa", dtype=dtype)
    atol = TEACHER_FORCING_ATOL[dtype]
    sampler, params, _ = lm_sampler(lm)
    config = SamplingConfig(
        max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.95, num_samples=2, seed=4,
        eos_token_ids=(1,),
    )  # fmt: skip
    out = jax.tree.map(np.asarray, sampler.sample(params, PROMPTS, config))
    logits = _completion_logits(lm, PROMPTS, out, 2)
    mask = np.asarray(out.mask)
    model_lp = _take(jax.nn.log_softmax(logits), out.tokens)
    warped = warp_logits(jnp.asarray(logits), temperature=0.9, top_k=20, top_p=0.95)
    sample_lp = _take(jax.nn.log_softmax(warped), out.tokens)
    np.testing.assert_allclose(out.model_logprobs[mask], model_lp[mask], atol=atol)
    np.testing.assert_allclose(out.logprobs[mask], sample_lp[mask], atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head", ["linear", "factored"])
@pytest.mark.parametrize("variant", ["separate", "shared"])
def test_guided_decoding_with_nado_model(models, variant, head, dtype):
    """The real NADO: own body + cache (separate) or a head on the LM's hidden states; a
    free linear head or the factored head through the LM's output embedding."""
    _, lm = models("llama_gqa", dtype=dtype)
    atol = TEACHER_FORCING_ATOL[dtype]
    nado_config = NadoConfig.for_lm(
        lm.config, variant, num_layers=1, head_init="normal", head=head, head_rank=4 * (
            variant == "shared")
    )  # fmt: skip
    nado = init_nado(nado_config, seed=3, lm_model=lm.model if head == "factored" else None)
    if head == "linear":
        nado.head.w[...] = 50.0 * nado.head.w[...]  # |h_φ| ~ 1: guidance visibly reshapes p
    else:  # W, u and the value term away from their zero start
        rng = np.random.default_rng(0)
        for name in ("proj", "up", "down", "shift", "value"):
            if hasattr(nado.head, name):
                var = getattr(nado.head, name)
                var[...] = jnp.asarray(rng.standard_normal(var.shape), var.dtype) * 0.5
    sampler, params, nado_params = lm_sampler(lm, nado)
    config = SamplingConfig(
        max_new_tokens=4, temperature=0.8, top_k=40, num_samples=2, seed=2, alpha=2.0
    )
    out = jax.tree.map(np.asarray, sampler.sample(params, PROMPTS, config, nado_params=nado_params))
    tokens, segs, first = _completion_rows(PROMPTS, out, 2)
    base = np.asarray(lm.logits(tokens, segment_ids=segs))
    if variant == "shared":
        h_lm, _ = lm.model.hidden_states(jnp.asarray(tokens), segment_ids_bt=jnp.asarray(segs))
        h_nado, _ = nado(jnp.asarray(tokens), lm_hidden_btd=h_lm)
    else:
        h_nado, _ = nado(jnp.asarray(tokens), segment_ids_bt=jnp.asarray(segs))
    cols = slice(first - 1, tokens.shape[1] - 1)
    base, h_nado = base[:, cols], np.asarray(h_nado)[:, cols]
    assert np.abs(h_nado).mean() > 0.3
    log_q = losses.guided_log_probs(jnp.asarray(base), jnp.asarray(h_nado), alpha=2.0)
    mask = np.asarray(out.mask)
    np.testing.assert_allclose(out.model_logprobs[mask], _take(log_q, out.tokens)[mask], atol=atol)
    warped = warp_logits(log_q, temperature=0.8, top_k=40)
    sample_lp = _take(jax.nn.log_softmax(warped), out.tokens)
    np.testing.assert_allclose(out.logprobs[mask], sample_lp[mask], atol=atol)
    base_lp = _take(jax.nn.log_softmax(base), out.tokens)
    np.testing.assert_allclose(out.base_logprobs[mask], base_lp[mask], atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_and_decode_weights_follow_the_compute_dtype(models, dtype):
    """By default the KV cache and the decode-form kernels are in the compute dtype (norms
    keep the master dtype); `cache_dtype` still overrides the cache."""
    _, lm = models("llama_gqa", dtype=dtype)
    model, params = decode_model_for(lm.model)
    cache = model.init_cache(params, 2, 8, SamplingConfig().static_spec().cache_jnp_dtype)
    assert cache.k.dtype == jnp.dtype(dtype)
    prepared, per_layer = model.prepare_decode(params, cache)
    assert {x.dtype for x in per_layer.k + per_layer.v} == {jnp.dtype(dtype)}
    leaves = jax.tree.leaves(prepared.layer_states)
    assert {x.dtype for x in leaves if x.ndim == 2} == {jnp.dtype(dtype)}  # kernels
    assert {x.dtype for x in leaves if x.ndim == 1} == {jnp.dtype("float32")}  # norms
    sampler, params, _ = lm_sampler(lm)
    config = SamplingConfig(max_new_tokens=4, temperature=0.0, cache_dtype="float32")
    wide = sampler.sample(params, PROMPTS, config)
    narrow = sampler.sample(params, PROMPTS, dataclasses.replace(config, cache_dtype=None))
    np.testing.assert_array_equal(np.asarray(wide.tokens), np.asarray(narrow.tokens))


@pytest.mark.slow
def test_sharded_8_devices_same_tokens_as_one_device(models):
    _, lm = models("llama_gqa")
    decode_model, params = decode_model_for(lm.model)
    config = SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=30, num_samples=2, seed=3)
    prompts = PROMPTS * 2
    single = jax.tree.map(np.asarray, Sampler(decode_model).sample(params, prompts, config))
    mesh = sharding.make_mesh((2, 2, 2))  # data x fsdp x tensor
    sharded_params = sharding.shard_state(params, mesh)
    sampler = Sampler(decode_model, mesh=mesh)
    assert sampler.batch_multiple == 4
    out = sampler.sample(sharded_params, prompts, config)
    assert len(out.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(out.tokens), single.tokens)
    np.testing.assert_allclose(np.asarray(out.model_logprobs), single.model_logprobs, atol=1e-4)
    prepared, _ = sampler.prepare(sharded_params)  # decode-form copies keep the sharding
    out = sampler.sample(prepared, prompts, config)
    np.testing.assert_array_equal(np.asarray(out.tokens), single.tokens)


@pytest.mark.slow
def test_generate_compiles_once_per_bucket_and_bf16_cache(models):
    _, lm = models("gpt2")
    sampler, _, _ = lm_sampler(lm)
    before = sampler.compile_count
    sample = dict(max_new_tokens=4, temperature=0.7, top_p=0.9)
    a = lm.generate(np.array([[3, 4, 5], [6, 7, 8]]), seed=1, **sample)
    b = lm.generate(np.array([[3, 4, 5, 6, 7, 8, 9]] * 2), seed=2, **sample)
    c = lm.generate(np.array([[9, 8, 7, 6, 5]] * 2), **{**sample, "temperature": 1.3})
    assert sampler.compile_count - before == 1  # one bucket, runtime temperature/seed
    assert a.shape == (2, 7) and b.shape == (2, 11) and c.shape == (2, 9)
    bf16 = lm.generate(np.array([[3, 4, 5]]), max_new_tokens=4, cache_dtype="bfloat16")
    assert bf16.shape == (1, 7) and (np.asarray(bf16) < VOCAB).all()
    # Options override the config's special tokens (here: no EOS, so no early stop).
    assert lm.generate(np.array([[3, 4]]), max_new_tokens=3, eos_token_ids=()).shape == (1, 5)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_prepared_params_give_the_same_samples(models, name):
    """`Sampler.prepare` (decode-form weights made once, as `sample_prompts` does) changes
    nothing in the output; it is idempotent and passes a NADO body through unchanged."""
    from jaxdetox.sampling import sample_prompts
    from jaxdetox.sampling.decode_form import DecodeParams

    _, lm = models(name)
    nado = init_nado(NadoConfig.for_lm(lm.config, "separate", num_layers=1), seed=1)
    sampler, params, nado_params = lm_sampler(lm, nado)
    config = SamplingConfig(max_new_tokens=5, temperature=0.9, top_k=20, num_samples=2, seed=4)
    ref = sampler.sample(params, PROMPTS, config, nado_params=nado_params)
    prepared, prepared_nado = sampler.prepare(params, nado_params)
    assert isinstance(prepared, DecodeParams) and sampler.prepare(prepared)[0] is prepared
    assert jax.tree.structure(prepared_nado) == jax.tree.structure(nado_params)
    got = sampler.sample(prepared, PROMPTS, config, nado_params=prepared_nado)
    driven = sample_prompts(
        sampler, params, PROMPTS, config, nado_params=nado_params, batch_size=2, progress=False
    )
    for out in (got, driven):
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
        np.testing.assert_allclose(
            np.asarray(out.model_logprobs), np.asarray(ref.model_logprobs), atol=1e-5
        )


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_per_layer_decode_path_equals_scanned_cache_path(models, name):
    """`prepare_decode` (per-layer weights, heads-major per-layer cache, unrolled layers)
    gives the same logits and cache contents as the scanned stacked-cache path."""
    from jaxdetox.models import init_cache
    from jaxdetox.models.layers import CausalLM
    from jaxdetox.sampling.decode_form import decode_hidden_states, decode_params

    _, lm = models(name)
    model, params = decode_model_for(lm.model)
    prompt = jnp.asarray([[0, 0, 5, 17, 33], [40, 41, 42, 43, 44]], jnp.int32)
    segments = (prompt != 0).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
    cache = init_cache(lm.config, 2, 9, jnp.float32)
    _, cache = model.apply(params, prompt, positions, segments, cache, last_only=True)
    fast_params, fast_cache = model.prepare_decode(params, cache)
    assert isinstance(fast_cache.k, tuple) and len(fast_cache.k) == lm.config.num_layers
    tokens = jnp.asarray([[7], [9]], jnp.int32)
    for step in range(3):
        pos = jnp.asarray([[3 + step], [5 + step]], jnp.int32)
        ones = jnp.ones_like(tokens)
        ref, cache = jax.jit(model.apply, static_argnums=5)(params, tokens, pos, ones, cache, False)
        got, fast_cache = jax.jit(model.apply, static_argnums=5)(
            fast_params, tokens, pos, ones, fast_cache, False
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
        tokens = jnp.argmax(ref[:, -1], axis=-1)[:, None].astype(jnp.int32)
    # Same cache contents, laid out per layer as [B, KVH, S, Dh].
    restacked = jnp.stack([k.transpose(0, 2, 1, 3) for k in fast_cache.k])
    np.testing.assert_allclose(np.asarray(restacked), np.asarray(cache.k), rtol=1e-5, atol=1e-6)
    assert int(fast_cache.index) == int(cache.index) == 8
    layer_states = decode_params(lm.model, params).layer_states
    with pytest.raises(ValueError, match="heads_major_cache"):
        decode_hidden_states(lm.model, layer_states, tokens, pos, ones, cache)
    assert isinstance(lm.model, CausalLM)
