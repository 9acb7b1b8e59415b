"""Evaluation: toxicity metrics (`rtp.py`, RealToxicityPrompts protocol) and result tables
(`report.py`)."""

from jaxdetox.evaluate.report import group_summaries, summary_markdown
from jaxdetox.evaluate.rtp import TOXIC_THRESHOLD, per_prompt_max, toxicity_summary

__all__ = [
    "TOXIC_THRESHOLD",
    "group_summaries",
    "per_prompt_max",
    "summary_markdown",
    "toxicity_summary",
]
