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
    assert table[4] == "| toxic | 1 | 2 | 0.700 | 1.000 | 0.400 | 0 |"
    assert list(group_summaries(tox, ok, prompt)) == ["all"]
