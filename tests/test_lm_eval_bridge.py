"""Log-likelihood scoring (`jaxdetox.evaluate.loglikelihood`) and the lm-evaluation-harness
model (`jaxdetox.evaluate.lm_eval_bridge`), checked against full logits, lm-eval's own window
functions and transformers (PyTorch) on the same saved tiny Llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests._tiny import tiny_llama

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
TASKS = ["jaxdetox_tiny_mc", "jaxdetox_tiny_gen", "jaxdetox_tiny_ppl"]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def _full_logits(lm, inputs, length=32):
    """[T, V] logits of one row, right-padded to `length` (causal: padding changes nothing
    before it), so every call has one shape and compiles once."""
    row = np.zeros((1, length), np.int32)
    row[0, : len(inputs)] = inputs
    return np.asarray(lm.logits(row))[0, : len(inputs)]


def _reference(lm, context, continuation, max_length):
    """Σ log p and all-argmax from the model's full [1, T, V] logits (lm-eval's truncation)."""
    whole = (list(context) + list(continuation))[-(max_length + 1) :]
    inputs, targets = whole[:-1], whole[1:]
    n = min(len(continuation), len(inputs))
    logits = _full_logits(lm, inputs)
    logp = _log_softmax(logits)
    rows = range(len(inputs) - n, len(inputs))
    total = sum(logp[t, targets[t]] for t in rows)
    greedy = all(int(logits[t].argmax()) == targets[t] for t in rows)
    return float(total), greedy


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(seed=3)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, lm):
    """The tiny Llama saved as an HF checkpoint dir (weights + tokenizer)."""
    return lm.save_pretrained(tmp_path_factory.mktemp("tiny_hf") / "model")


def _random_requests(rng, n, vocab, max_ctx=20, max_cont=6):
    return [
        (
            rng.integers(3, vocab, rng.integers(1, max_ctx)).tolist(),
            rng.integers(3, vocab, rng.integers(1, max_cont)).tolist(),
        )
        for _ in range(n)
    ]


def test_rolling_windows_match_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from jaxdetox.evaluate.loglikelihood import rolling_windows

    for n in [0, 1, 3, 4, 5, 9, 10, 17]:
        for max_length in [1, 2, 4, 7]:
            tokens = list(range(10, 10 + n))
            expected = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(tokens, 99, max_length, context_len=1)
            ]
            assert rolling_windows(tokens, 99, max_length) == expected, (n, max_length)
            predicted = [t for _, cont in rolling_windows(tokens, 99, max_length) for t in cont]
            assert predicted == tokens


def test_scorer_matches_full_logits_and_compiles_once_per_bucket(lm):
    from jaxdetox.evaluate.loglikelihood import Scorer

    rng = np.random.default_rng(0)
    requests = _random_requests(rng, 13, lm.config.vocab_size)
    # Greedy continuations (is_greedy must be True), and one with its last token changed.
    context = requests[0][0]
    greedy = np.asarray(lm.generate(np.asarray([context]), max_new_tokens=4, eos_token_ids=()))
    greedy_cont = greedy[0, len(context) :].tolist()
    not_greedy = greedy_cont[:-1] + [(greedy_cont[-1] + 1) % lm.config.vocab_size]
    requests += [(context, greedy_cont), (context, not_greedy), (context, greedy_cont[:1])]
    # A request longer than max_length + 1 is cut from the left.
    requests.append((rng.integers(3, 300, 40).tolist(), rng.integers(3, 300, 3).tolist()))

    scorer = Scorer(lm, batch_size=4, length_multiple=16, continuation_multiple=4, max_length=24)
    out = scorer.score(requests)
    for (ctx, cont), (logprob, is_greedy) in zip(requests, out):
        ref_logprob, ref_greedy = _reference(lm, ctx, cont, 24)
        assert logprob == pytest.approx(ref_logprob, abs=1e-4)
        assert is_greedy == ref_greedy
    assert [g for _, g in out[-4:-1]] == [True, False, True]

    # Buckets: inputs rounded to 16 and continuations to 4 tokens; one executable each.
    first = scorer.compile_count
    assert 1 <= first <= 4
    again = scorer.score(list(reversed(requests)))[::-1]
    assert scorer.compile_count == first
    # Another batch order: other rows share each batch, so the sums may differ in the last bits.
    np.testing.assert_allclose([x for x, _ in again], [x for x, _ in out], rtol=0, atol=1e-4)
    assert [g for _, g in again] == [g for _, g in out]


def test_scorer_on_mesh_equals_single_device(lm):
    from jaxdetox import evaluate
    from jaxdetox.evaluate.loglikelihood import Scorer
    from jaxdetox.models import random_init
    from jaxdetox.sharding import make_mesh

    mesh = make_mesh((4, 1, 2))
    sharded = random_init(lm.config, seed=3, mesh=mesh, tokenizer=lm.tokenizer)
    rng = np.random.default_rng(1)
    requests = _random_requests(rng, 9, lm.config.vocab_size)
    scorer = Scorer(sharded, batch_size=6, length_multiple=16)
    assert scorer.batch_size == 8  # rounded up to the 4 data-parallel devices
    on_mesh = scorer.score(requests)
    plain = evaluate.score_continuations(lm, requests, batch_size=6, length_multiple=16)
    np.testing.assert_allclose([x for x, _ in on_mesh], [x for x, _ in plain], atol=1e-5)
    assert [g for _, g in on_mesh] == [g for _, g in plain]


def test_rolling_loglikelihood_sums_every_token_once(lm):
    from jaxdetox.evaluate.loglikelihood import loglikelihood_rolling

    rng = np.random.default_rng(2)
    docs = [rng.integers(3, 300, n).tolist() for n in (5, 16, 37)]
    got = loglikelihood_rolling(lm, docs, prefix_token=1, max_length=16, length_multiple=16)
    for doc, value in zip(docs, got):
        # Reference: windows predict doc[lo:hi], lo = 0, 16, 32, ..., each from the (at most)
        # 16 tokens of [prefix] + doc that precede doc[hi - 1] (a full context when possible).
        full, expected = [1] + doc, 0.0
        for lo in range(0, len(doc), 16):
            hi = min(lo + 16, len(doc))
            start = max(0, hi - 16)
            logp = _log_softmax(_full_logits(lm, full[start:hi]))
            expected += sum(logp[j - start, full[j + 1]] for j in range(lo, hi))
        assert value == pytest.approx(expected, abs=1e-4)


def test_encode_pair_moves_trailing_space_and_uses_bos(lm):
    from jaxdetox.evaluate.loglikelihood import encode_pair

    tok = lm.tokenizer
    ctx, cont = encode_pair(tok, "The quick brown ", "fox")
    assert ctx[0] == tok.bos_token_id
    assert ctx + cont == tok.encode("The quick brown fox")
    assert tok.decode(cont) == " fox"
    assert encode_pair(tok, "", " fox") == (
        [tok.bos_token_id],
        tok.encode(" fox", add_special_tokens=False),
    )


def test_resolve_model_path_and_registry(tmp_path):
    from lm_eval.api.registry import get_model

    from jaxdetox.evaluate.lm_eval_bridge import JaxdetoxLM, resolve_model_path

    assert get_model("jaxdetox") is JaxdetoxLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models stay registered

    (tmp_path / "run" / "final" / "model").mkdir(parents=True)
    assert resolve_model_path(tmp_path / "run") == str(tmp_path / "run" / "final" / "model")
    assert resolve_model_path("default") == "default"
    assert resolve_model_path(tmp_path / "x.gguf") == str(tmp_path / "x.gguf")


def _torch_loglikelihood(model, tok, context, continuation):
    """lm-eval's split (HFLM._encode_pair) scored by transformers on the whole string."""
    import torch

    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    rows = range(n_ctx - 1, len(whole) - 1)
    total = sum(float(logp[t, whole[t + 1]]) for t in rows)
    greedy = all(int(logits[t].argmax()) == whole[t + 1] for t in rows)
    return total, greedy


@pytest.mark.slow
def test_local_tasks_end_to_end_match_transformers(hf_dir, tmp_path, monkeypatch):
    """A multiple-choice, a generation and a perplexity task from local YAML + jsonl run
    offline through lm-eval; per-choice log-likelihoods equal transformers' within 1e-4."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxdetox.evaluate.lm_eval_bridge import run_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    tasks_dir = tmp_path / "tasks"
    shutil.copytree(FIXTURES, tasks_dir)
    monkeypatch.chdir(tasks_dir)  # the YAMLs name their jsonl relative to the working dir

    # A jaxdetox run directory: the bridge loads its final/model.
    run_dir = tmp_path / "run"
    shutil.copytree(hf_dir, run_dir / "final" / "model")
    results = run_lm_eval(
        run_dir, TASKS, include_path=tasks_dir, include_defaults=False, log_samples=True
    )

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(hf_dir))

    rows = [json.loads(x) for x in (FIXTURES / "tiny_mc.jsonl").read_text().splitlines()]
    samples = results["samples"]["jaxdetox_tiny_mc"]
    assert len(samples) == len(rows)
    worst, correct = 0.0, 0
    for sample in samples:
        ours = [r[0] for r in sample["filtered_resps"]]
        assert len(ours) == len(rows[sample["doc_id"]]["choices"])
        ref = [_torch_loglikelihood(model, tok, c, x) for c, x in sample["arguments"]]
        worst = max(worst, max(abs(a - b[0]) for a, b in zip(ours, ref)))
        assert [r[1] for r in sample["filtered_resps"]] == [g for _, g in ref]
        correct += int(np.argmax([v for v, _ in ref]) == rows[sample["doc_id"]]["label"])
    print(f"max |loglikelihood - transformers| = {worst:.2e}")
    assert worst < 1e-4
    mc = results["results"]["jaxdetox_tiny_mc"]
    assert mc["acc,none"] == pytest.approx(correct / len(rows))

    # Perplexity task: Σ log p(doc) from rolling windows (one window here) == transformers.
    for sample in results["samples"]["jaxdetox_tiny_ppl"]:
        (text,) = sample["arguments"][0]
        ids = tok.encode(text)  # BOS added, then the prefix (BOS) as lm-eval's HF model does
        whole = [tok.bos_token_id] + ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        ref = sum(float(logp[t, whole[t + 1]]) for t in range(len(whole) - 1))
        assert sample["filtered_resps"][0] == pytest.approx(ref, abs=1e-4)

    # Generation: greedy, cut at the first stop string; equals transformers' greedy text.
    for sample in results["samples"]["jaxdetox_tiny_gen"]:
        context, gen_kwargs = sample["arguments"][0]
        text = sample["resps"][0][0]
        assert "\n" not in text and "." not in text
        ids = tok.encode(context)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        ref = tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
        for stop in ("\n", "."):
            ref = ref.split(stop)[0]
        assert text == ref
