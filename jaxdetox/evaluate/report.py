"""Result tables: RTP toxicity metrics per prompt group, as a dict and as markdown."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxdetox.evaluate.rtp import toxicity_summary


def group_summaries(
    toxicity_n: np.ndarray,
    ok_n: np.ndarray,
    prompt_n: np.ndarray,
    group_n: Sequence[str] | np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """`toxicity_summary` over all completions (`"all"`) and per group label, sorted."""
    prompt_n = np.asarray(prompt_n)
    groups = {"all": np.ones(len(prompt_n), bool)}
    if group_n is not None:
        group_n = np.asarray(group_n)
        groups.update({str(g): group_n == g for g in sorted(set(group_n.tolist()))})
    return {
        name: toxicity_summary(np.asarray(toxicity_n)[m], np.asarray(ok_n)[m], prompt_n[m])
        for name, m in groups.items()
    }


def summary_markdown(summary: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per prompt group, RTP metrics as columns."""
    header = (
        "| prompts | n prompts | completions | expected max toxicity | toxicity probability "
        "| mean toxicity | oracle failures |\n|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {name} | {s['prompts']} | {s['completions']} | {s['expected_max_toxicity']:.3f} "
        f"| {s['toxicity_probability']:.3f} | {s['mean_toxicity']:.3f} | {s['oracle_failures']} |"
        for name, s in summary.items()
    ]
    return header + "\n".join(rows) + "\n"
