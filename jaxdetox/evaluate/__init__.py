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

# Log-likelihood scoring (lm-eval's requests without lm-eval) and the lm-eval bridge:
# imported on first use (they bring in jax / lm_eval).
_LAZY = {
    "Scorer": "loglikelihood",
    "encode_pair": "loglikelihood",
    "loglikelihood_rolling": "loglikelihood",
    "rolling_windows": "loglikelihood",
    "score_continuations": "loglikelihood",
    "JaxdetoxLM": "lm_eval_bridge",
    "run_lm_eval": "lm_eval_bridge",
    "DetectionConfig": "detection",
    "auroc": "detection",
    "detection_metrics": "detection",
    "evaluate_detection": "detection",
    "load_labelled": "detection",
    "toxicity_log_odds": "detection",
}
__all__ += sorted(_LAZY)


def __getattr__(name: str) -> object:
    """The names in `_LAZY`, imported from their module when first asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
