"""Pipeline stages 1-2: samples and labels persist per chunk and resume without recomputing."""

import numpy as np
import pytest

from jaxdetox.data import PromptSet, SampleStore, tokenize_prompts
from jaxdetox.lm import lm_sampler
from jaxdetox.pipeline.constraints import oracle_label_name
from jaxdetox.pipeline.label import label_stage
from jaxdetox.pipeline.sample import sample_stage, sample_stage_lm
from jaxdetox.sampling import SamplingConfig
from tests._tiny import tiny_llama

TEXTS = ["The quick brown", "She said that", "A long time ago the city", "Thanks for", "Prices"]


@pytest.fixture(scope="module")
def lm():
    return tiny_llama()


@pytest.fixture(scope="module")
def prompts(lm):
    n = len(TEXTS)
    prompt_set = PromptSet(
        ids=np.arange(100, 100 + n, dtype=np.int64), keys=tuple(TEXTS), texts=tuple(TEXTS),
        toxicity=np.full(n, np.nan, np.float32), challenging=np.zeros(n, bool), source="t",
    )  # fmt: skip
    return tokenize_prompts(prompt_set, lm.tokenizer)


CONFIG = SamplingConfig(max_new_tokens=6, top_k=20, num_samples=3, eos_token_ids=(2,), seed=3)


class CountingOracle:
    """Toxicity = fraction of vowels; counts the texts it is asked to score."""

    oracle_id = "vowels-v1"

    def __init__(self, fail_on: str | None = None):
        self.seen = 0
        self.fail_on = fail_on

    def score(self, texts):
        self.seen += len(texts)
        tox = np.array([sum(c in "aeiou" for c in t) / max(len(t), 1) for t in texts], np.float32)
        ok = np.array([self.fail_on is None or self.fail_on not in t for t in texts])
        return np.where(ok, tox, np.nan).astype(np.float32), ok


def test_resumed_sampling_equals_uninterrupted(lm, prompts, tmp_path):
    full = SampleStore(tmp_path / "full")
    report = sample_stage_lm(lm, prompts, full, 0, CONFIG, batch_size=2, progress=False)
    assert report.processed == len(TEXTS)
    # A rerun of a finished stage does nothing.
    assert sample_stage_lm(lm, prompts, full, 0, CONFIG, batch_size=2).processed == 0
    # Chunk names carry the process index (multi-host: each process commits its share).
    assert full.chunks(0) and all(c.endswith("-p000") for c in full.chunks(0))

    # The same stage from a sampler and a params pytree (as a training loop calls it).
    sampler, params, _ = lm_sampler(lm)
    stage = dict(tokenizer=lm.tokenizer, batch_size=2, progress=False)

    # "Crash" after the first batch: only its chunk is committed, the stage is not done.
    part = SampleStore(tmp_path / "part")
    first = prompts.__class__(
        ids=prompts.ids[:2], tokens=prompts.tokens[:2], texts=prompts.texts[:2],
        num_truncated=0, num_dropped=0, source="t",
    )  # fmt: skip
    sample_stage(sampler, params, first, part, 0, CONFIG, **stage)
    (part.root / "iter_0000" / "sampled.done.json").unlink()
    resumed = sample_stage(sampler, params, prompts, part, 0, CONFIG, **stage)
    assert (resumed.processed, resumed.skipped) == (len(TEXTS) - 2, 2)

    a, b = full.read_samples(0), part.read_samples(0)
    assert a.num_rows == b.num_rows == len(TEXTS) * CONFIG.num_samples
    for column in ("prompt_id", "sample_index", "completion_tokens", "completion_text"):
        assert a[column].to_pylist() == b[column].to_pylist(), column


def test_labels_resume_and_failures_stay_masked(lm, prompts, tmp_path):
    store = SampleStore(tmp_path / "s")
    sample_stage_lm(lm, prompts, store, 0, CONFIG, batch_size=8, progress=False)
    n = len(TEXTS) * CONFIG.num_samples
    oracle = CountingOracle()
    label_stage(store, 0, oracle, "vowels", batch_size=4, progress=False)
    assert oracle.seen == n
    assert label_stage(store, 0, oracle, "vowels", batch_size=4).processed == 0
    assert oracle.seen == n  # nothing rescored

    table = store.read(0, "vowels")
    assert np.all(table["ok"].to_numpy(zero_copy_only=False))
    texts = table["completion_text"].to_pylist()
    expected = [sum(c in "aeiou" for c in t) / max(len(t), 1) for t in texts]
    np.testing.assert_allclose(table["toxicity"].to_numpy(zero_copy_only=False), expected, 1e-6)

    # An oracle that fails on some texts: those are committed as ok=False, never clean.
    failing = CountingOracle(fail_on="e")
    label_stage(store, 0, failing, "failing", batch_size=5, progress=False)
    table = store.read(0, "failing")
    ok = table["ok"].to_numpy(zero_copy_only=False)
    assert list(ok) == ["e" not in t for t in texts]
    assert np.all(np.isnan(table["toxicity"].to_numpy(zero_copy_only=False)[~ok]))


def test_oracle_label_name():
    assert oracle_label_name("hf:/models/toxigen roberta") == "hf_models_toxigen_roberta"
    assert oracle_label_name("default") == "default"


class FlakyOracle:
    """Fails on texts containing `fail_on` while `down`; counts the calls per text."""

    oracle_id = "flaky-v1"

    def __init__(self, fail_on: str):
        self.fail_on, self.down = fail_on, True
        self.calls: dict[str, int] = {}

    def score(self, texts):
        for t in texts:
            self.calls[t] = self.calls.get(t, 0) + 1
        ok = np.array([not (self.down and self.fail_on in t) for t in texts], bool)
        tox = np.array([len(t) % 7 / 7 for t in texts], np.float32)
        return np.where(ok, tox, np.nan).astype(np.float32), ok


def test_failed_labels_are_retried_and_good_ones_never_rescored(lm, prompts, tmp_path):
    store = SampleStore(tmp_path / "s")
    sample_stage_lm(lm, prompts, store, 0, CONFIG, batch_size=8, progress=False)
    texts = store.read_samples(0)["completion_text"].to_pylist()
    fail_on = max("aeiou", key=lambda c: sum(c in t for t in texts))  # fails some, not all
    failing = [fail_on in t for t in texts]
    assert 0 < sum(failing) < len(texts)
    oracle = FlakyOracle(fail_on)

    first = label_stage(store, 0, oracle, "flaky", batch_size=4, progress=False)
    assert first.extra["failures_left"] == sum(failing) and first.processed == len(texts)
    assert not store.is_done(0, "labelled-flaky")  # failures left: not done
    assert list(store.read(0, "flaky")["ok"].to_pylist()) == [not f for f in failing]

    # Still down: the rerun retries exactly the failures, and they fail again.
    again = label_stage(store, 0, oracle, "flaky", batch_size=3, progress=False)
    assert (again.processed, again.skipped) == (sum(failing), len(texts) - sum(failing))
    assert again.extra["failures_left"] == sum(failing)

    oracle.down = False
    last = label_stage(store, 0, oracle, "flaky", batch_size=3, progress=False)
    assert (last.processed, last.extra["failures_left"]) == (sum(failing), 0)
    assert store.is_done(0, "labelled-flaky")
    table = store.read(0, "flaky")
    assert all(table["ok"].to_pylist())  # the good labels supersede the failed ones
    expected = [len(t) % 7 / 7 for t in table["completion_text"].to_pylist()]
    np.testing.assert_allclose(table["toxicity"].to_numpy(), expected, rtol=1e-6)
    for text, fails in zip(texts, failing):  # each good text scored exactly once
        assert oracle.calls[text] == (3 if fails else 1) * texts.count(text), text
    attempts = store.label_attempts(0, "flaky")["attempts"].to_pylist()
    assert sorted(set(attempts)) == [1, 3]
    batch = next(iter(store.batches(0, len(texts), oracle="flaky", shuffle=False)))
    assert batch["ok_b"].all() and not np.isnan(batch["toxicity_b"]).any()
    assert label_stage(store, 0, oracle, "flaky").processed == 0


def test_max_attempts_finishes_the_stage_with_failures_masked(lm, prompts, tmp_path):
    store = SampleStore(tmp_path / "s")
    sample_stage_lm(lm, prompts, store, 0, CONFIG, batch_size=8, progress=False)
    texts = store.read_samples(0)["completion_text"].to_pylist()
    fail_on = max("aeiou", key=lambda c: sum(c in t for t in texts))
    n_fail = sum(fail_on in t for t in texts)
    oracle = FlakyOracle(fail_on)
    for attempt in (1, 2):
        report = label_stage(store, 0, oracle, "flaky", max_attempts=2, progress=False)
        assert report.extra["failures_left"] == n_fail
        assert store.is_done(0, "labelled-flaky") == (attempt == 2)
    assert store.unlabelled(0, "flaky", max_attempts=2).num_rows == 0
    assert store.unlabelled(0, "flaky").num_rows == n_fail
    assert store.read(0, "flaky")["ok"].to_pylist().count(False) == n_fail
