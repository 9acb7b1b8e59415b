"""PNG plots of a report: toxicity per iteration, toxicity vs perplexity, stage times.

Toxicity carries error bars of one standard error over prompts where the runs recorded one;
iteration axes have integer ticks; legends sit beside the axes, never over the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from jaxdetox.evaluate.runs import row_names  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


STAGE_COLORS = {
    "sample": "#4C72B0",
    "label": "#DD8452",
    "train_nado": "#55A868",
    "finetune": "#C44E52",
}


def _legend_beside(ax: plt.Axes, **kwargs: Any) -> None:
    """The legend to the right of `ax`, outside it, so it covers no bar or point."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), **kwargs)


def _stderrs(points: list[dict[str, Any]], key: str) -> list[float]:
    """`key`'s standard error of each point (NaN, i.e. no bar, where it was not recorded)."""
    return [float("nan") if p.get(f"{key}_stderr") is None else p[f"{key}_stderr"]
            for p in points]  # fmt: skip


def _iteration_ticks(ax: plt.Axes, iterations: set[int]) -> None:
    """Ticks at the evaluated iterations (integers; all of them when few, so a single
    evaluated iteration is still labelled), else integer ticks chosen by matplotlib."""
    if len(iterations) <= 12:
        ax.set_xticks(sorted(iterations))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _palette(n: int) -> tuple:
    """Distinct colours for n series: tab10 (strong) up to 10, tab20 (paired shades) above."""
    return plt.get_cmap("tab10" if n <= 10 else "tab20").colors


def toxicity_per_iteration(summaries: list[dict[str, Any]], out: Path) -> Path | None:
    """Mean and expected maximum toxicity of each run's evaluated LLM versions."""
    runs = [s for s in summaries if len(s["curve"]) >= 1]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    colors = _palette(len(runs))
    names = row_names([s["rows"][-1] for s in runs])  # a run's last row is its method's
    for i, (s, label) in enumerate(zip(runs, names)):
        its = [p["iteration"] for p in s["curve"]]
        for ax, key in zip(axes, ("mean_toxicity", "expected_max_toxicity")):
            ax.errorbar(its, [p[key] for p in s["curve"]], yerr=_stderrs(s["curve"], key),
                        marker="o", capsize=3, label=label, color=colors[i % len(colors)])  # fmt: skip
    iterations = {p["iteration"] for s in runs for p in s["curve"]}
    for ax, title in zip(axes, ("Mean toxicity", "Expected max toxicity")):
        ax.set_xlabel("iteration (0 = base model)")
        ax.set_ylabel(f"{title.lower()} (± 1 s.e.)")
        ax.set_title(f"{title} on held-out prompts")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        _iteration_ticks(ax, iterations)
    _legend_beside(axes[1])  # one legend for both
    return _save(fig, out / "toxicity_per_iteration.png")


def toxicity_vs_perplexity(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """One point per method: mean toxicity against held-out perplexity (lower-left is better)."""
    rows = [r for r in rows if r.get("perplexity") and r.get("mean_toxicity") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = _palette(len(rows))
    for i, (r, name) in enumerate(zip(rows, row_names(rows))):
        # the legend gives every λ; the labels on the points only where rows share a method
        label = (
            name if "λ" in name or r.get("kl_weight") is None else f"{name} (λ={r['kl_weight']:g})"
        )
        point = (r["perplexity"], r["mean_toxicity"])
        color = colors[i % len(colors)]
        ax.errorbar(*point, yerr=_stderrs([r], "mean_toxicity"), color=color, capsize=3)
        ax.scatter(*point, s=60, color=color, label=label)
        ax.annotate(name, point, xytext=(5, 5), textcoords="offset points", fontsize=9)
    ax.set_xlabel("perplexity on held-out clean text")
    ax.set_ylabel("mean toxicity of generations (± 1 s.e.)")
    ax.set_title("Toxicity vs fluency (lower-left is better)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.08)  # room for the labels of the outermost points
    _legend_beside(ax)
    return _save(fig, out / "toxicity_vs_perplexity.png")


def stage_times(summaries: list[dict[str, Any]], out: Path) -> Path | None:
    """Stacked seconds per training stage for each iteration of each run."""
    bars = [(s["method"], it, t) for s in summaries for it, t in sorted(s["times"].items())]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(bars) + 3), 4))
    labels = [f"{m}\niter {it}" for m, it, _ in bars]
    bottom = [0.0] * len(bars)
    for stage, color in STAGE_COLORS.items():
        heights = [t.get(stage, 0.0) for _, _, t in bars]
        ax.bar(labels, heights, bottom=bottom, color=color, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("seconds")
    ax.set_title("Time per iteration by stage")
    _legend_beside(ax, reverse=True)  # top to bottom as stacked
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "stage_times.png")


def iteration_times(summaries: list[dict[str, Any]], out: Path) -> Path | None:
    """Per run and iteration: measured wall time next to the sum of its stages (the
    sequential cost) and its slowest stage (the ideal overlapped cost)."""
    bars = [(s, it, w) for s in summaries for it, w in s.get("walls", {}).items()]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(bars) + 3), 4))
    x = range(len(bars))
    width = 0.28
    for offset, key, label in ((-width, "sum", "sum of stages"), (0.0, "wall", "wall time"),
                               (width, "slowest", "slowest stage")):  # fmt: skip
        ax.bar([i + offset for i in x], [w[key] for _, _, w in bars], width, label=label)
    ax.set_xticks(list(x))
    ax.set_xticklabels(
        [f"{s['method']} ({s['placement']})\niter {it}" for s, it, _ in bars], fontsize=8
    )
    ax.set_ylabel("seconds")
    ax.set_title("Iteration time: sum of stages, measured wall, slowest stage", fontsize=10)
    _legend_beside(ax)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "iteration_times.png")


def lambda_sweep(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Mean toxicity and held-out perplexity against λ, for methods run at several λ."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("kl_weight") is not None and r.get("mean_toxicity") is not None:
            by_method.setdefault(r["method"], []).append(r)
    sweeps = {m: sorted(rs, key=lambda r: r["kl_weight"]) for m, rs in by_method.items()}
    sweeps = {m: rs for m, rs in sweeps.items() if len({r["kl_weight"] for r in rs}) > 1}
    if not sweeps:
        return None
    fig, (tox_ax, ppl_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for method, rs in sweeps.items():
        lambdas = [r["kl_weight"] for r in rs]
        tox_ax.errorbar(lambdas, [r["mean_toxicity"] for r in rs], capsize=3, marker="o",
                        yerr=_stderrs(rs, "mean_toxicity"), label=method)  # fmt: skip
        ppl_ax.plot(lambdas, [r.get("perplexity") for r in rs], marker="o", label=method)
    for ax, label in ((tox_ax, "mean toxicity"), (ppl_ax, "perplexity on held-out text")):
        ax.set_xlabel("λ (weight of the KL term)")
        ax.set_ylabel(label)
        ax.set_title(f"{label.capitalize()} vs λ")
        ax.grid(alpha=0.3)
    _legend_beside(ppl_ax)  # one legend for both
    return _save(fig, out / "lambda_sweep.png")
