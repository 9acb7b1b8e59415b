"""The whole method, checked exactly on a task small enough to enumerate (issue 22, item 4).

The task: a random 2-layer Llama over 7 words + EOS (`tests._tiny.tiny_word_llama`), 8 prompts
of two words, completions of at most `T` = 4 tokens (EOS ends one early), and the project's
lexicon oracle forbidding the word "x": C(x, y) = 1 − 1[y contains "x"] (the configured
label transform, `oracles.make_labels`). Every completion of every prompt is enumerated
(8^4 EOS-padded sequences, `tests._enumeration`), which gives exactly, per prompt
(docs/method.md §1):

- p(y|x) and C(x, y); R(x, y_≤t) for every prefix by the Bellman recursion; R(x) = E_p[C];
- q*(y|x) = p(y|x)·C(x, y)/R(x), whose satisfaction E_q*[C] is 1 for this hard oracle.

The pipeline runs through the project's own code path, `jaxdetox run`'s `execute` with a config
dict: sample k completions per prompt from the base LM → label them with the oracle → train
NADO_1 → (largest k only, method `pr_sequential`) fine-tune LLM_1 with λ·KL(q ‖ p_θ); the
smaller k run method `nado_decoding` (the same stages without the fine-tune). Its exported
NADO (`final/nado`) and LLM (`final/model`) are then read back and measured against the exact
quantities. Every satisfaction below is the mean over the 8 prompts of an exact expectation.

Fixed seeds, no timing. The bounds were chosen from measurements over several pipeline seeds
(see each test) with margin; `NADO_VARIANTS` lists the `nado:` config sections measured (add a
head variant there, one line, and every check runs for it).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdetox.data import SampleStore
from tests import _enumeration as en

pytestmark = pytest.mark.slow

WORDS = ("a", "b", "c", "d", "e", "f", "x")
FORBIDDEN = "x"
EOS = 0  # make_word_tokenizer: id 0 is EOS (and pad)
T = 4  # max_new_tokens
PROMPTS = ("a b", "c d", "e f", "f a", "b c", "d e", "a c", "b d")
SIZES = (4, 16, 512)  # samples per prompt; the largest also fine-tunes
GUIDED_SAMPLES = 256  # per prompt, drawn by the guided sampler at the largest size
ORACLE = {"name": "lexicon", "args": {"words": [FORBIDDEN]}}

NADO_BATCH, NADO_STEPS, NADO_LR, NADO_SCHEDULE = 32, 128, 1e-2, "cosine"
FT_STEPS, FT_LR = 64, 3e-3

# Bounds (see each test; chosen from the measurements quoted there, with margin).
RATE_ERROR_SHRINK = 0.75  # each size's error below this share of the previous size's
RATE_ERROR_BOUND = 0.07  # p-weighted mean |R_φ − R| at the largest size
RATE_ERROR_EVERY_BOUND = 0.1  # the same over every next token
GUIDED_TV_BOUND = 0.12  # TV(q, q*) at the largest size
GUIDED_GAP = 0.95  # share of the gap R(x) → E_q*[C] closed by guided decoding
FINETUNE_GAP = 0.9  # ... by the fine-tuned LLM
FINETUNE_KL_SHARE = 0.15  # KL(q* ‖ p_θ) over KL(q* ‖ p)

# id -> the run config's `nado:` section (merged); a head variant is one more entry.
NADO_VARIANTS = {
    "linear": {},
    "factored": {"head": "factored", "bias_init": "label_mean"},
}


@dataclasses.dataclass
class Task:
    """The enumerated task: exact quantities per prompt (lists in `PROMPTS` order)."""

    root: object  # Path of the model dir, prompt file and runs
    prompts: list[np.ndarray]  # token ids per prompt
    oracle_c: np.ndarray  # C over the (V,)^T EOS-padded completions (same for every prompt)
    base: list[en.TinyLM]  # p per prompt (rows after EOS: a point mass on EOS)
    rates: list[list[np.ndarray]]  # exact R(x, y_≤t), t = 0..T, per prompt

    @property
    def base_satisfaction(self) -> float:
        """E_p[C] = R(x), mean over prompts."""
        return float(np.mean([r[0] for r in self.rates]))

    def q_star(self, i: int) -> np.ndarray:
        """q*(y|x_i) over the (V,)^T table."""
        p = np.exp(self.base[i].sequence_log_probs())
        return p * self.oracle_c / self.rates[i][0]

    @property
    def q_star_satisfaction(self) -> float:
        """E_q*[C], mean over prompts."""
        return float(
            np.mean([np.sum(self.q_star(i) * self.oracle_c) for i in range(len(self.prompts))])
        )


def oracle_table(tokenizer, vocab: int) -> np.ndarray:  # noqa: ANN001
    """C of every EOS-padded completion, from the project's oracle and label transform."""
    from jaxdetox import oracles

    texts = tokenizer.batch_decode(
        en.completions(en.all_sequences(vocab, T), EOS), skip_special_tokens=True
    )
    unique = sorted(set(texts))
    score, ok = oracles.load(ORACLE["name"], **ORACLE["args"]).score(unique)
    assert ok.all()
    labels, _ = oracles.make_labels(np.asarray(score), np.asarray(ok))
    c = dict(zip(unique, np.asarray(labels, np.float64)))
    return np.array([c[t] for t in texts]).reshape((vocab,) * T)


@functools.partial(jax.jit, static_argnums=0)
def _module_logits(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
    """Teacher-forced logits of an LM or NADO module (both return (logits, cache))."""
    return nnx.merge(graphdef, state)(tokens)[0]


def tables_of(module: nnx.Module, prompt: np.ndarray, vocab: int) -> list[np.ndarray]:
    """A module's next-token logits after prompt∘y_≤t for every y_≤t (t < T), as tables."""
    graphdef, state = nnx.split(module)
    fn = lambda toks: _module_logits(graphdef, state, jnp.asarray(toks))  # noqa: E731
    return en.continuation_tables(fn, prompt, vocab, T)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Task:
    from tests._tiny import tiny_word_llama

    root = tmp_path_factory.mktemp("exact")
    lm = tiny_word_llama(WORDS, seed=0)
    lm.save_pretrained(root / "model")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    vocab = lm.config.vocab_size
    c = oracle_table(lm.tokenizer, vocab)
    prompts = [np.asarray(lm.tokenizer(p)["input_ids"], np.int32) for p in PROMPTS]
    base = [en.stopping_lm(tables_of(lm.model, p, vocab), EOS) for p in prompts]
    rates = [en.success_rates(b, c) for b in base]
    return Task(root, prompts, c, base, rates)


def run_config(task: Task, k: int, nado: dict, seed: int = 0) -> dict:
    """The run config of one pipeline: k samples per prompt, `nado` merged into `nado:`.

    The NADO gets the same optimisation budget at every k (NADO_STEPS steps of NADO_BATCH
    samples, cosine-decayed learning rate: the last iterate is not left noisy), so its error
    shrinking with k is the effect of more samples, not of more steps. (Epochs times rows is
    kept a multiple of the batch: a planned step count above the stream's length stops the
    stage, issue 22.) The fine-tune: FT_STEPS steps of 64 samples' prefixes.
    """
    from tests._tiny_run import tiny_config

    rows = k * len(PROMPTS)
    nado_batch, nado_steps = NADO_BATCH, NADO_STEPS
    config = tiny_config(
        task.root / "model",
        nado={"num_layers": 1, **nado},
        prompts={"source": str(task.root / "prompts.jsonl"), "kind": None,
                 "block_size": len(PROMPTS), "max_tokens": 4},
        oracle=ORACLE,
        sampling={"num_samples": k, "max_new_tokens": T, "top_k": 0, "batch_size": 8,
                  "seed": seed},
        train_nado={"batch_size": nado_batch, "max_steps": nado_steps,
                    "epochs": -(-nado_steps * nado_batch // rows),
                    "optimizer": {"learning_rate": NADO_LR, "schedule": NADO_SCHEDULE}},
        finetune={"batch_size": 64, "epochs": 1, "max_steps": FT_STEPS,
                  "optimizer": {"learning_rate": FT_LR}},
        loop={"iterations": 1, "checkpoint_every": 1000, "async_checkpoints": False},
        eval={"enabled": False},
    )  # fmt: skip
    method = "pr_sequential" if k == max(SIZES) else "nado_decoding"
    return {**config, "name": f"exact-k{k}", "method": method, "seed": seed}


@dataclasses.dataclass
class Measurement:
    """What one pipeline run achieved, against the exact task (means over prompts)."""

    label_mean: float  # mean label C of the pipeline's own samples (drawn from p)
    label_se: float  # its standard error
    rate_error: float  # p-weighted mean |R_φ − R| over visited next tokens (en.rate_error)
    rate_error_every: float  # the same over every next token of visited prefixes
    guided_satisfaction: float  # E_q[C], q = base ⊕ NADO (losses.guided_log_probs), exact
    guided_tv: float  # total variation between q and q* over completions
    sampled_satisfaction: float | None = None  # mean C of the guided sampler's samples
    sampled_se: float | None = None
    finetuned_satisfaction: float | None = None  # E_pθ[C] of the fine-tuned LLM, exact
    finetuned_kl: float | None = None  # KL(q* ‖ p_θ) (base: −log R(x))


def measure(task: Task, run_dir, with_finetune: bool) -> Measurement:  # noqa: ANN001
    """Read a run's exported NADO (and LLM) back and compare them with the exact task."""
    from jaxdetox import losses
    from jaxdetox.models import load_nado, load_pretrained

    base = load_pretrained(task.root / "model")
    nado = load_nado(run_dir / "final" / "nado")
    tuned = load_pretrained(run_dir / "final" / "model") if with_finetune else None
    vocab = base.config.vocab_size
    rows = []
    for i, prompt in enumerate(task.prompts):
        h = tables_of(nado, prompt, vocab)
        rates = task.rates[i]
        with jax.enable_x64(True):
            log_q = [
                np.asarray(losses.guided_log_probs(jnp.asarray(b), jnp.asarray(n), alpha=1.0))
                for b, n in zip(task.base[i].logits, h)
            ]
        q = np.exp(en.stopping_lm(log_q, EOS).sequence_log_probs())
        row = {
            "rate_error": en.rate_error(task.base[i], rates, h, EOS, every=False),
            "rate_error_every": en.rate_error(task.base[i], rates, h, EOS, every=True),
            "guided_satisfaction": float(np.sum(q * task.oracle_c)),
            "guided_tv": 0.5 * float(np.sum(np.abs(q - task.q_star(i)))),
        }
        if with_finetune:
            p_theta = en.stopping_lm(tables_of(tuned.model, prompt, vocab), EOS)
            q_star, log_p = task.q_star(i), p_theta.sequence_log_probs()
            support = q_star > 0
            row["finetuned_satisfaction"] = float(en.success_rates(p_theta, task.oracle_c)[0])
            row["finetuned_kl"] = float(
                np.sum(q_star[support] * (np.log(q_star[support]) - log_p[support]))
            )
        rows.append(row)
    labels = sample_labels(run_dir)
    out = Measurement(
        label_mean=float(np.mean(labels)),
        label_se=float(np.std(labels) / np.sqrt(len(labels))),
        **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]},
    )
    if with_finetune:
        out.sampled_satisfaction, out.sampled_se = guided_sample(task, base, nado)
    return out


def sample_labels(run_dir) -> np.ndarray:  # noqa: ANN001
    """The labels C of the run's samples S_1, as the label stage stored them (every prompt
    has the same number of samples, so their mean weights the prompts equally)."""
    from jaxdetox import oracles
    from jaxdetox.pipeline.constraints import oracle_label_name
    from jaxdetox.pipeline.rundir import RunDir

    table = SampleStore(RunDir(run_dir).samples).read(1, oracle_label_name(ORACLE["name"]))
    ok = table["ok"].to_numpy(zero_copy_only=False)
    assert ok.all()
    tox = table["toxicity"].to_numpy(zero_copy_only=False)
    return np.asarray(oracles.make_labels(tox, ok)[0], np.float64)


def guided_sample(task: Task, base, nado) -> tuple[float, float]:  # noqa: ANN001
    """Mean C (and its standard error) of completions drawn by the guided sampler."""
    from jaxdetox import oracles
    from jaxdetox.lm import lm_sampler
    from jaxdetox.sampling import SamplingConfig, sample_prompts

    sampler, params, nado_params = lm_sampler(base, nado)
    config = SamplingConfig(
        max_new_tokens=T, num_samples=GUIDED_SAMPLES, eos_token_ids=(EOS,), pad_token_id=EOS,
        seed=7,
    )  # fmt: skip
    out = sample_prompts(
        sampler, params, list(task.prompts), config, batch_size=8, nado_params=nado_params,
        progress=False,
    )  # fmt: skip
    texts = base.tokenizer.batch_decode(
        [t[:n] for t, n in zip(out.tokens, out.lengths)], skip_special_tokens=True
    )
    score, ok = oracles.load(ORACLE["name"], **ORACLE["args"]).score(texts)
    c, _ = oracles.make_labels(np.asarray(score), np.asarray(ok))
    return float(np.mean(c)), float(np.std(c) / np.sqrt(len(c)))


@pytest.fixture(scope="module", params=list(NADO_VARIANTS))
def measured(request, task) -> dict[int, Measurement]:  # noqa: ANN001
    """Run the pipeline at every k in `SIZES` for one NADO variant; measure each run."""
    from jaxdetox.commands.session import execute
    from jaxdetox.config import config_from_dict

    out = {}
    for k in SIZES:
        run_dir = task.root / f"{request.param}-k{k}"
        config = run_config(task, k, NADO_VARIANTS[request.param])
        execute(config_from_dict(config), run_dir, progress=False)
        out[k] = measure(task, run_dir, with_finetune=k == max(SIZES))
    return out


def test_exact_task_is_consistent(task):
    """The enumeration itself: tables match the model, p sums to 1, the identities hold."""
    from tests._tiny import tiny_word_llama

    lm = tiny_word_llama(WORDS, seed=0)
    for i, prompt in enumerate(task.prompts):
        p, rates = task.base[i], task.rates[i]
        # every completion is one EOS-padded sequence: p sums to 1 over the (V,)^T table
        np.testing.assert_allclose(np.exp(p.sequence_log_probs()).sum(), 1.0, rtol=1e-9)
        np.testing.assert_allclose(rates[0], np.sum(np.exp(p.sequence_log_probs()) * task.oracle_c))
        assert 0.1 < rates[0] < 0.9  # the constraint binds, and is satisfiable
        # table rows are the model's logits after prompt∘y_≤t (one completion, checked)
        y = np.array([3, 7, 1], np.int32)
        logits = np.asarray(lm.logits(np.concatenate([prompt, y])[None]))[0, len(prompt) - 1 :]
        for t in range(3):
            np.testing.assert_allclose(p.logits[t][tuple(y[:t])], logits[t], atol=1e-5)
        q_star = task.q_star(i)
        np.testing.assert_allclose(q_star.sum(), 1.0, rtol=1e-9)
        assert np.sum(q_star * task.oracle_c) == pytest.approx(1.0)  # a hard oracle
        # KL(q* ‖ p) = −log R(x) for a hard oracle (docs/method.md §1)
        support = q_star > 0
        kl = np.sum(q_star[support] * (np.log(q_star[support]) - p.sequence_log_probs()[support]))
        np.testing.assert_allclose(kl, -np.log(rates[0]), rtol=1e-9)
    # the forbidden word ends every completion's satisfaction, wherever it occurs
    v = {w: i + 1 for i, w in enumerate(WORDS)}
    assert task.oracle_c[v["a"], v["x"], EOS, EOS] == 0 and task.oracle_c[v["a"], EOS, 7, 7] == 1


def test_samples_and_labels_follow_p_and_c(measured, task):
    """Sample + label stages: the mean label of S_1 is R(x) = E_p[C] within 4 standard errors
    at every k (±0.03 at k = 512): the samples come from p and the labels are C."""
    for k, m in measured.items():
        assert abs(m.label_mean - task.base_satisfaction) < 4 * m.label_se + 1e-9, (k, m)


def test_nado_approaches_the_exact_success_rate(measured):
    """(a) The p-weighted mean |R_φ − R| over the next tokens sampling from p visits
    (`en.rate_error`, what the BCE trains) shrinks below RATE_ERROR_SHRINK of the previous
    size's at every size, and is below RATE_ERROR_BOUND at the largest; the same error over
    every next token of the visited prefixes (what the guided teacher reads) shrinks too and
    is below RATE_ERROR_EVERY_BOUND. Measured over pipeline seeds 0–3 (k = 4 → 16 → 512):
    0.19–0.23 → 0.10–0.13 → 0.036–0.045 (ratios ≤ 0.61), every token 0.24–0.33 → 0.15–0.20
    → 0.060–0.070."""
    errors = [measured[k].rate_error for k in SIZES]
    every = [measured[k].rate_error_every for k in SIZES]
    for small, large in zip(errors, errors[1:]):
        assert large < RATE_ERROR_SHRINK * small, errors
    for small, large in zip(every, every[1:]):
        assert large < small, every
    assert errors[-1] < RATE_ERROR_BOUND, errors
    assert every[-1] < RATE_ERROR_EVERY_BOUND, every


def test_guided_decoding_approaches_q_star(measured, task):
    """(b) q = base ⊕ NADO (the guided teacher, `losses.guided_log_probs`, exact over every
    completion): its total variation from q* shrinks with the samples and is below
    GUIDED_TV_BOUND at the largest k, where its satisfaction E_q[C] closes more than
    GUIDED_GAP of the gap from R(x) to E_q*[C] = 1; the guided sampler's own draws
    (GUIDED_SAMPLES per prompt) agree with that exact E_q[C] within 4 standard errors.
    Measured over seeds 0–3: TV 0.25–0.43 → 0.19–0.24 → 0.066–0.086; at k = 512 E_q[C] =
    0.995–0.997 from R(x) = 0.53 (gap closed ≥ 0.98), the sampler within 0.003 of it."""
    tv = [measured[k].guided_tv for k in SIZES]
    for small, large in zip(tv, tv[1:]):
        assert large < small, tv
    assert tv[-1] < GUIDED_TV_BOUND, tv
    largest = measured[max(SIZES)]
    base, target = task.base_satisfaction, task.q_star_satisfaction
    assert largest.guided_satisfaction - base > GUIDED_GAP * (target - base), largest
    gap = abs(largest.sampled_satisfaction - largest.guided_satisfaction)
    assert gap < 4 * largest.sampled_se + 1e-3, largest


def test_finetuned_lm_moves_towards_q_star(measured, task):
    """(c) LLM_1 (trained on λ·KL(q ‖ p_θ) over the samples' prefixes): its exact
    satisfaction E_pθ[C] closes more than FINETUNE_GAP of the gap from R(x) to E_q*[C], and
    KL(q* ‖ p_θ) falls below FINETUNE_KL_SHARE of KL(q* ‖ p) = −log R(x). Measured over seeds
    0–3: E_pθ[C] = 0.992–0.994 from 0.53 (gap closed ≥ 0.98); KL 0.040–0.045 from 0.65."""
    largest = measured[max(SIZES)]
    base, target = task.base_satisfaction, task.q_star_satisfaction
    assert largest.finetuned_satisfaction - base > FINETUNE_GAP * (target - base), largest
    base_kl = float(np.mean([-np.log(r[0]) for r in task.rates]))
    assert largest.finetuned_kl < FINETUNE_KL_SHARE * base_kl, (largest.finetuned_kl, base_kl)
