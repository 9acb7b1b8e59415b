"""Fluency and diversity metrics on hand-made fixtures with known answers."""

import math

import jax
import numpy as np
from flax import nnx

from jaxdetox.evaluate.fluency import distinct_n, nll_sums, text_windows
from jaxdetox.models import ModelConfig, build_model


def test_distinct_n_by_hand():
    prompts = [[[1, 2, 3], [1, 2, 4]], [[5, 5, 5, 5]], [[7]]]
    # prompt 1: unigrams 1,2,3,1,2,4 -> 4/6; prompt 2: 1/4; prompt 3: 1/1
    np.testing.assert_allclose(distinct_n(prompts, 1), np.mean([4 / 6, 1 / 4, 1.0]))
    # bigrams: prompt 1 (1,2),(2,3),(1,2),(2,4) -> 3/4; prompt 2 (5,5)x3 -> 1/3; prompt 3 none
    np.testing.assert_allclose(distinct_n(prompts, 2), np.mean([3 / 4, 1 / 3]))
    assert math.isnan(distinct_n([[[1]]], 2))


def test_text_windows_cover_every_token_once():
    docs = [list(range(1, 11)), [20, 21, 22]]
    batches = text_windows(docs, seq_len=4, batch_size=2)
    rows = [(b["tokens_bt"][i], b["loss_mask_bt"][i]) for b in batches for i in range(2)]
    predicted = [t for toks, mask in rows for t, m in zip(toks[1:], mask[:-1]) if m]
    # windows [1-4], [5-8], [9,10], [20-22]: every token but a window's first is a target
    assert predicted == [2, 3, 4, 6, 7, 8, 10, 21, 22]
    assert all(b["tokens_bt"].shape == (2, 4) for b in batches)
    filler = batches[-1]
    assert filler["segment_ids_bt"].sum() == 0 or filler["loss_mask_bt"].sum() > 0


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    config = ModelConfig(
        family="llama", vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
        num_kv_heads=2, head_dim=8, intermediate_size=32,
    )  # fmt: skip
    model = build_model(config, 0)
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(np.zeros_like, nnx.to_pure_dict(params))  # all logits 0: uniform
    batch = {"text": text_windows([list(range(1, 30))], seq_len=8, batch_size=4)[0]}
    out = jax.jit(lambda p, b: nll_sums(p, b, graphdef=graphdef))(params, batch)
    np.testing.assert_allclose(
        math.exp(float(out["nll_sum"]) / float(out["tokens"])), 50, rtol=1e-5
    )
    assert float(out["tokens"]) == 25  # 29 tokens in 4 windows: 7 + 7 + 7 + 4 targets


def test_continuation_perplexity_of_another_family_matches_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from jaxdetox.evaluate.fluency import continuation_perplexity
    from jaxdetox.models import load_pretrained
    from tests._tokenizer import make_tokenizer

    # A GPT-2 fluency model with its own tokenizer (no BOS, another vocabulary).
    tok = make_tokenizer(vocab_size=300)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=2, eos_token_id=2)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    prompts = ["The quick brown fox", "Thanks for the help ", "Prices rose", "A long time"]
    completions = [" jumps over the dog.", "with the report!", "", " ago the city built"]
    ours = continuation_perplexity(
        load_pretrained(tmp_path / "gpt2"), prompts, completions, batch_size=2
    )

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    nll, tokens = 0.0, 0
    for p, c in zip(prompts, completions):
        if not c:
            continue
        context = tok.encode(p.rstrip())
        whole = tok.encode(p.rstrip() + p[len(p.rstrip()) :] + c)
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0].double(), -1)
        for i in range(len(context), len(whole)):
            nll -= float(logp[i - 1, whole[i]])
        tokens += len(whole) - len(context)
    np.testing.assert_allclose(ours, math.exp(nll / tokens), rtol=1e-4)
