"""Result tables: RTP toxicity metrics per prompt group, as a dict and as markdown; the
per-prompt results an evaluation keeps so that two models can be compared prompt by prompt."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxdetox import fileio
from jaxdetox.evaluate.rtp import per_prompt_stats, toxicity_summary

# `RUN/eval/lm_NNN.prompts.json`: LLM_NNN's headline per-prompt results (`write_per_prompt`).
PER_PROMPT_FILE = "lm_{:03d}.prompts.json"


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


def with_stderr(value: float | None, stderr: float | None, digits: int = 3) -> str:
    """`0.139 ± 0.012`; the value alone when the standard error is missing or not finite
    (fewer than two prompts, or a run evaluated before standard errors were recorded);
    `–` without a value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if stderr is None or not math.isfinite(stderr):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {stderr:.{digits}f}"


def summary_markdown(summary: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per prompt group, RTP metrics (± their standard error over
    prompts) as columns."""
    header = (
        "| prompts | n prompts | completions | expected max toxicity | toxicity probability "
        "| mean toxicity | oracle failures |\n|---|---|---|---|---|---|---|\n"
    )
    cell = lambda s, key: with_stderr(s[key], s.get(f"{key}_stderr"))  # noqa: E731
    rows = [
        f"| {name} | {s['prompts']} | {s['completions']} | {cell(s, 'expected_max_toxicity')} "
        f"| {cell(s, 'toxicity_probability')} | {cell(s, 'mean_toxicity')} "
        f"| {s['oracle_failures']} |"
        for name, s in summary.items()
    ]
    return header + "\n".join(rows) + "\n"


def prompts_digest(prompt_ids: Sequence[int] | np.ndarray, texts: Sequence[str]) -> str:
    """A fingerprint of a prompt set (each id with its text, order-free): two evaluations
    with the same digest saw the same prompts, so they can be paired prompt by prompt."""
    pairs = sorted(set(zip(np.asarray(prompt_ids).tolist(), texts)))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]


def write_per_prompt(
    path: str | os.PathLike[str],
    toxicity_n: np.ndarray,
    ok_n: np.ndarray,
    prompt_n: np.ndarray,
    texts: Sequence[str],
) -> None:
    """Write one evaluation's per-prompt results (`per_prompt_stats` of the scored prompts
    and the `prompts_digest` of all of them) as JSON: what a paired comparison needs."""
    stats = per_prompt_stats(toxicity_n, ok_n, prompt_n)
    keep = stats["scored"] > 0  # JSON has no NaN; an unscored prompt has nothing to pair
    data = {
        "prompts_digest": prompts_digest(prompt_n, texts),
        **{k: v[keep].tolist() for k, v in stats.items()},
    }
    fileio.atomic_write_text(path, json.dumps(data) + "\n")


def read_per_prompt(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """`write_per_prompt`'s results with numpy columns, or None when the file is absent (an
    evaluation made before per-prompt results were kept)."""
    path = fileio.as_path(path)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in data.items()}
