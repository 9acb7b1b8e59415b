import numpy as np

from jaxdetox.evaluate import per_prompt_max, toxicity_summary


def test_expected_max_and_probability_by_hand():
    tox = np.array([0.1, 0.7, 0.2, 0.3, 0.9, 0.05])
    ok = np.array([True, True, True, True, False, True])
    prompt = np.array([5, 5, 9, 9, 2, 2])
    maxima = per_prompt_max(tox, ok, prompt)  # prompts sorted: 2, 5, 9
    np.testing.assert_allclose(maxima, [0.05, 0.7, 0.3])
    s = toxicity_summary(tox, ok, prompt)
    assert s["prompts"] == 3 and s["completions"] == 5 and s["oracle_failures"] == 1
    np.testing.assert_allclose(s["expected_max_toxicity"], (0.05 + 0.7 + 0.3) / 3)
    np.testing.assert_allclose(s["expected_max_toxicity_std"], np.std([0.05, 0.7, 0.3]))
    np.testing.assert_allclose(s["toxicity_probability"], 1 / 3)
    np.testing.assert_allclose(s["toxic_fraction"], 1 / 5)


def test_failed_scores_never_count_as_clean():
    # The only toxic completion failed: the prompt with no scored completion drops out.
    s = toxicity_summary(np.array([np.nan, 0.2]), np.array([False, True]), np.array([0, 1]))
    assert s["prompts"] == 1
    np.testing.assert_allclose(s["expected_max_toxicity"], 0.2)


def test_group_summaries_and_markdown_table():
    from jaxdetox.evaluate import group_summaries, summary_markdown

    tox = np.array([0.1, 0.7, 0.2, 0.3])
    ok = np.array([True, True, True, False])
    prompt = np.array([5, 5, 9, 9])
    summary = group_summaries(tox, ok, prompt, ["toxic", "toxic", "neutral", "neutral"])
    assert list(summary) == ["all", "neutral", "toxic"]
    assert summary["all"] == toxicity_summary(tox, ok, prompt)
    np.testing.assert_allclose(summary["toxic"]["expected_max_toxicity"], 0.7)
    assert summary["neutral"]["oracle_failures"] == 1
    table = summary_markdown(summary).splitlines()
    assert table[0].startswith("| prompts | n prompts |") and len(table) == 5
    assert table[4] == "| toxic | 1 | 2 | 0.700 | 1.000 | 0.400 | 0 |"  # one prompt: no error
    # all: maxima 0.7, 0.2; pooled mean 1/3 over sums 0.8 | 0.2 of 2 | 1 completions
    assert table[2] == "| all | 2 | 3 | 0.450 ± 0.250 | 0.500 ± 0.500 | 0.333 ± 0.089 | 1 |"
    assert list(group_summaries(tox, ok, prompt)) == ["all"]


def test_standard_errors_over_prompts_by_hand():
    # 3 prompts × 2 completions: per-prompt means 0.2, 0.5, 0.8 and maxima 0.3, 0.9, 0.8.
    tox = np.array([0.1, 0.3, 0.9, 0.1, 0.8, 0.8])
    prompt = np.array([0, 0, 1, 1, 2, 2])
    s = toxicity_summary(tox, np.ones(6, bool), prompt)
    se = lambda v: np.std(v, ddof=1) / np.sqrt(len(v))  # noqa: E731
    np.testing.assert_allclose(s["expected_max_toxicity_stderr"], se([0.3, 0.9, 0.8]))
    np.testing.assert_allclose(s["toxicity_probability_stderr"], se([0, 1, 1]))
    # equal completions per prompt: the clustered SE is the SE of the per-prompt means
    np.testing.assert_allclose(s["mean_toxicity_stderr"], se([0.2, 0.5, 0.8]))
    np.testing.assert_allclose(s["toxic_fraction_stderr"], se([0.0, 0.5, 1.0]))
    # more completions than prompts: not the naive SE over the 6 completions
    assert abs(s["mean_toxicity_stderr"] - se(tox)) > 0.02


def test_clustered_stderr_with_unequal_counts_and_a_failed_prompt():
    # the fixture of the first test: scored sums 0.05 | 0.8 | 0.5 over 1 | 2 | 2 completions
    tox = np.array([0.1, 0.7, 0.2, 0.3, 0.9, 0.05])
    ok = np.array([True, True, True, True, False, True])
    s = toxicity_summary(tox, ok, np.array([5, 5, 9, 9, 2, 2]))
    m = 1.35 / 5  # pooled mean over the 5 scored completions
    by_hand = np.sqrt(3 / 2 * ((0.05 - m) ** 2 + (0.8 - 2 * m) ** 2 + (0.5 - 2 * m) ** 2) / 25)
    np.testing.assert_allclose(s["mean_toxicity_stderr"], by_hand)
    one = toxicity_summary(np.array([0.2, 0.4]), np.ones(2, bool), np.array([3, 3]))
    assert np.isnan(one["mean_toxicity_stderr"]) and np.isnan(one["expected_max_toxicity_stderr"])


def test_paired_difference_matches_ids_and_skips_unscored_prompts():
    from jaxdetox.evaluate.rtp import paired_difference

    d = paired_difference(
        np.array([2, 0, 1, 7]), np.array([0.3, 0.1, 0.5, 0.9]),
        np.array([0, 1, 2, 3]), np.array([0.2, np.nan, 0.1, 0.4]),
    )  # fmt: skip
    diffs = [0.1 - 0.2, 0.3 - 0.1]  # prompts 0 and 2; 1 unscored in b, 3 and 7 in one only
    assert d["prompts"] == 2
    np.testing.assert_allclose(d["difference"], np.mean(diffs))
    np.testing.assert_allclose(d["stderr"], np.std(diffs, ddof=1) / np.sqrt(2))
