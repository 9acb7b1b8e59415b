"""Results of run directories as rows, one per method: what `jaxdetox report` tabulates.

A run contributes the row `base` (its iteration-0 eval, when it has one) and the row named by
its config's `method` (its last eval), plus per-iteration curves and stage times for the
plots. Rows always carry `method`, `expected_max_toxicity`, `toxicity_probability` and
`perplexity`; the rest when measured: among them `<figure>_stderr` (the standard error over
prompts of each toxicity figure) and, for rows evaluated on the base row's prompts, the
paired difference of mean toxicity from the base (`compare_with_base`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from jaxdetox.evaluate.report import PER_PROMPT_FILE, read_per_prompt, with_stderr
from jaxdetox.evaluate.rtp import paired_difference
from jaxdetox.fileio import as_path

ROW_KEYS = (
    "expected_max_toxicity",
    "expected_max_toxicity_std",
    "expected_max_toxicity_stderr",
    "toxicity_probability",
    "toxicity_probability_stderr",
    "mean_toxicity",
    "mean_toxicity_stderr",
    "perplexity",
    "fluency_perplexity",
    "distinct_1",
    "distinct_2",
    "distinct_3",
    "prompts",
    "completions",
    "detection_auroc",
    "detection_f1",
    "utility",
)
TRAIN_STAGES = ("sample", "label", "train_nado", "finetune")


def _row_kl_weight(method: str, config: dict[str, Any]) -> float | None:
    """The λ a row shows: the method's (`Method.row_kl_weight`; a row label of an
    evaluation-only directory: its saved `finetune.kl_weight`)."""
    from jaxdetox.methods import REGISTRY
    from jaxdetox.methods.method import finetune_kl_weight

    entry = REGISTRY.get(method)
    return (finetune_kl_weight if entry is None else entry.row_kl_weight)(config)


def _manifest(run: Path) -> list[dict[str, Any]]:
    from jaxdetox.pipeline.rundir import read_manifest

    records = read_manifest(run)
    if not records:
        raise FileNotFoundError(f"{run}: no manifest.json (not a jaxdetox run directory)")
    return records


def _config(run: Path) -> dict[str, Any]:
    path = run / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def _finite(value: Any) -> Any:
    """A standard error that could not be computed (NaN: fewer than two prompts) as None, so
    results.json stays valid JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _row(method: str, record: dict[str, Any], run: Path, **extra: Any) -> dict[str, Any]:
    out = record["outputs"]
    row = {"method": method}
    row.update({k: _finite(out[k]) if k.endswith("_stderr") else out[k]
                for k in ROW_KEYS if k in out})  # fmt: skip
    toxic = out.get("groups", {}).get("toxic", {})
    row["toxic_prompts_expected_max_toxicity"] = toxic.get("expected_max_toxicity")
    if "expected_max_toxicity_stderr" in toxic:
        row["toxic_prompts_expected_max_toxicity_stderr"] = _finite(
            toxic["expected_max_toxicity_stderr"]
        )
    for name, c in out.get("constraints", {}).items():  # per-constraint satisfaction
        row[f"satisfied_{name}"] = c.get("satisfaction")
    return {**row, "run": str(run), "lm_version": record["iteration"], **extra}


def iteration_times(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Seconds per training stage per iteration, from done stage records."""
    times: dict[int, dict[str, float]] = {}
    for r in records:
        if r["stage"] in TRAIN_STAGES and r["status"] == "done" and r["seconds"] is not None:
            times.setdefault(r["iteration"], {})[r["stage"]] = r["seconds"]
    return times


def iteration_walls(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per iteration: `wall` (first training stage's start to the last one's end), `sum` (its
    stages one after another) and `slowest` (one stage: what a perfectly overlapped
    iteration costs), in seconds, from done records that carry start times."""
    spans: dict[int, list[tuple[float, float]]] = {}
    for r in records:
        if r["stage"] in TRAIN_STAGES and r["status"] == "done" and r.get("started") is not None:
            spans.setdefault(r["iteration"], []).append((r["started"], r["seconds"]))
    return {
        it: {
            "start": min(s for s, _ in pairs),
            "end": max(s + d for s, d in pairs),
            "wall": max(s + d for s, d in pairs) - min(s for s, _ in pairs),
            "sum": sum(d for _, d in pairs),
            "slowest": max(d for _, d in pairs),
        }
        for it, pairs in sorted(spans.items())
    }


def train_samples(records: list[dict[str, Any]], config: dict[str, Any]) -> int:
    """Training samples the run drew: prompts of its done sample stages × samples per prompt."""
    k = config.get("sampling", {}).get("num_samples", 4)
    done = [r for r in records if r["stage"] == "sample" and r["status"] == "done"]
    return sum(int(r["outputs"].get("prompts", 0)) * k for r in done)


def run_summary(run: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything a report needs from one run: rows, eval curve, stage times, scheme."""
    run = as_path(run)
    records = _manifest(run)
    config = _config(run)
    method = config.get("method", "pr_sequential")
    evals = sorted(
        (r for r in records if r["stage"] == "eval" and r["status"] == "done"),
        key=lambda r: r["iteration"],
    )
    times = iteration_times(records)
    train_seconds = sum(sum(t.values()) for t in times.values())
    rows = []
    samples = train_samples(records, config)
    if evals and evals[0]["iteration"] == 0:
        # An evaluation-only directory (`jaxdetox eval`) names its one row by its method.
        first = evals[0]["outputs"].get("completions")
        rows.append(_row("base" if times else method, evals[0], run, seconds=0.0,
                         train_samples=0, oracle_calls=first))  # fmt: skip
    if evals and evals[-1]["iteration"] > 0:
        kl = _row_kl_weight(method, config)
        # the oracle scored every training sample and the completions of each eval after the base
        scored = sum(r["outputs"].get("completions") or 0 for r in evals if r["iteration"] > 0)
        rows.append(_row(method, evals[-1], run, seconds=train_seconds, kl_weight=kl,
                         train_samples=samples, oracle_calls=samples + scored))  # fmt: skip
    curve = [
        {"iteration": r["iteration"], **{k: r["outputs"].get(k) for k in ROW_KEYS}} for r in evals
    ]
    loop = config.get("loop", {})
    return {"run": str(run), "method": method, "scheme": loop.get("scheme", "sequential"),
            "placement": loop.get("placement", "colocated"), "rows": rows, "curve": curve,
            "times": times, "walls": iteration_walls(records),
            "nado_quality": nado_quality_records(records)}  # fmt: skip


def nado_quality_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`[{iteration, constraint, **nado_quality}]` of a run's done train_nado stages (the
    main oracle's NADO as constraint None, further constraints' by name)."""
    out = []
    for r in sorted(records, key=lambda r: r["iteration"]):
        if r["stage"] != "train_nado" or r["status"] != "done":
            continue
        for key, quality in r["outputs"].items():
            if key == "nado_quality" or key.startswith("nado_quality_"):
                name = key[len("nado_quality_") :] or None
                out.append({"iteration": r["iteration"], "constraint": name, **quality})
    return out


def nado_quality_markdown(summaries: list[dict[str, Any]]) -> str:
    """Each trained NADO's held-out quality; a NADO that does not beat the constant
    predictor is flagged (its guidance is no better than none), the BCE gain carries its
    standard error over held-out prompts and `*` where it exceeds two of them."""
    lines = [
        "| run | iteration | NADO | held-out BCE | constant BCE | gain | AUROC | ECE "
        "| vocab coverage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    flagged = False
    for s, name in zip(summaries, row_names(summaries)):  # runs named as in the table
        for q in s.get("nado_quality", []):

            def f(key: str, digits: int = 3, q: dict = q) -> str:
                return "–" if q.get(key) is None else f"{q[key]:.{digits}f}"

            flag = "" if q.get("beats_constant", True) else " ⚠"
            flagged |= bool(flag)
            gain = f("bce_gain", 4)
            if q.get("bce_gain_stderr") is not None:
                gain += f" ± {q['bce_gain_stderr']:.4f}" + (
                    " *" if q.get("clearly_beats_constant") else ""
                )
            lines.append(
                f"| {name} | {q['iteration']} | {q['constraint'] or 'oracle'} "
                f"| {f('heldout_bce', 4)}{flag} | {f('constant_bce', 4)} | {gain} "
                f"| {f('auroc')} | {f('ece')} | {f('vocab_coverage')} |"
            )
    if len(lines) == 2:
        return ""
    note = (
        "\ngain: constant BCE − held-out BCE ± its standard error over held-out prompts; "
        "`*`: beyond two of them.\n"
    )
    if flagged:
        note += ("\n⚠ held-out BCE not below the constant predictor's: that NADO has learnt "
                 "nothing it can use.\n")  # fmt: skip
    return "\n".join(lines) + "\n" + note


def expand_runs(runs: list[str | os.PathLike[str]]) -> list[Any]:
    """Run directories, a λ sweep's directory (`sweep.json`) replaced by its runs."""
    import json

    from jaxdetox.pipeline.rundir import read_manifest

    out = []
    for run in map(as_path, runs):
        index = run / "sweep.json"
        if index.exists() and not read_manifest(run):
            out += [run / name for name in json.loads(index.read_text())["runs"]]
        else:
            out.append(run)
    return out


def collect(runs: list[str | os.PathLike[str]]) -> tuple[list[dict], list[dict]]:
    """`(rows, summaries)` over several runs (a sweep's directory stands for its runs); one
    `base` row (the first run's) is kept, and every other row compared with it
    (`compare_with_base`)."""
    summaries = [run_summary(r) for r in expand_runs(runs)]
    rows, have_base = [], False
    for s in summaries:
        for row in s["rows"]:
            if row["method"] == "base":
                if have_base:
                    continue
                have_base = True
            rows.append(row)
    compare_with_base(rows)
    return rows, summaries


NO_BASE = "no base row among the reported runs"
OTHER_PROMPTS = "evaluated on other prompts than the base row"
NO_PER_PROMPT = (
    "no per-prompt results (evaluated before they were kept), so no paired standard error"
)


def _per_prompt(row: dict[str, Any]) -> dict[str, Any] | None:
    return read_per_prompt(as_path(row["run"]) / "eval" / PER_PROMPT_FILE.format(row["lm_version"]))


def compare_with_base(rows: list[dict[str, Any]]) -> None:
    """Set on every row but `base`: `delta_mean_toxicity` (mean over prompts of the row's
    per-prompt mean toxicity minus the base's), `delta_mean_toxicity_stderr` (its paired
    standard error) and `paired_prompts` when both were evaluated on the same prompts, else
    `delta_note` saying why not (`NO_BASE`, `OTHER_PROMPTS`, `NO_PER_PROMPT`)."""
    base = next((r for r in rows if r["method"] == "base"), None)
    base_prompts = _per_prompt(base) if base is not None else None
    for row in rows:
        if row is base:
            continue
        if base is None:
            row["delta_note"] = NO_BASE
            continue
        mine = _per_prompt(row)
        if mine is None or base_prompts is None:
            row["delta_note"] = NO_PER_PROMPT
        elif mine["prompts_digest"] != base_prompts["prompts_digest"]:
            row["delta_note"] = OTHER_PROMPTS
        else:
            d = paired_difference(mine["prompt_id"], mine["mean_toxicity"],
                                  base_prompts["prompt_id"], base_prompts["mean_toxicity"])  # fmt: skip
            row["delta_mean_toxicity"] = _finite(d["difference"])
            row["delta_mean_toxicity_stderr"] = _finite(d["stderr"])
            row["paired_prompts"] = d["prompts"]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _utility(scores: dict[str, float] | None) -> str:
    if not scores:
        return "–"
    return ", ".join(f"{task} {value:.3f}" for task, value in sorted(scores.items()))


def steady_iteration_time(walls: dict[int, dict[str, float]]) -> dict[str, float] | None:
    """Wall time per iteration after the first (which compiles, and is the parallel
    scheme's warm-up) — the time between the ends of consecutive iterations, so pipelined
    roles that run ahead are not counted twice — with the mean sum of an iteration's stages
    and its slowest stage over the same iterations (`iteration_walls` input)."""
    its = sorted(walls)
    if not its:
        return None
    if len(its) > 1:
        wall = (walls[its[-1]]["end"] - walls[its[0]]["end"]) / (len(its) - 1)
        its = its[1:]
    else:
        wall = walls[its[0]]["wall"]
    return {
        "iterations": len(its),
        "wall": wall,
        "sum": sum(walls[i]["sum"] for i in its) / len(its),
        "slowest": sum(walls[i]["slowest"] for i in its) / len(its),
    }


def iteration_time_markdown(summaries: list[dict[str, Any]]) -> str:
    """Sequential vs parallel: each run's `steady_iteration_time` as a table row."""
    lines = [
        "| run | scheme | placement | iterations | wall / iteration (s) | sum of stages (s) "
        "| slowest stage (s) | wall / slowest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        t = steady_iteration_time(s["walls"])
        if t is None:
            continue
        lines.append(
            f"| {s['method']} | {s['scheme']} | {s['placement']} | {t['iterations']} "
            f"| {t['wall']:.1f} | {t['sum']:.1f} | {t['slowest']:.1f} "
            f"| {t['wall'] / t['slowest']:.2f} |"
        )
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def row_names(rows: list[dict[str, Any]]) -> list[str]:
    """Each row's display name: its method, plus `(λ=…)` where several rows share the method
    (a λ sweep's runs), plus the run directory's name where that still leaves two rows alike
    (the same method and λ under other settings); the table and the plots name rows alike."""
    methods = [r["method"] for r in rows]
    names = [
        f"{r['method']} (λ={r['kl_weight']:g})"
        if methods.count(r["method"]) > 1 and r.get("kl_weight") is not None
        else r["method"]
        for r in rows
    ]
    return [
        f"{name} [{PurePosixPath(str(r.get('run', ''))).name}]" if names.count(name) > 1 else name
        for name, r in zip(names, rows)
    ]


def _delta(row: dict[str, Any], base: dict[str, Any] | None, notes: list[str]) -> str:
    """The `Δ mean tox. vs base` cell: relative change, ± its paired standard error, `*` past
    two of them; a numbered note (in `notes`) where it or its error is missing."""
    if row is base:
        return "–"
    note = row.get("delta_note")
    mark = ""
    if note is not None:
        if note not in notes:
            notes.append(note)
        mark = f" ({notes.index(note) + 1})"
    ref = base.get("mean_toxicity") if base is not None else None
    if not ref or note in (NO_BASE, OTHER_PROMPTS) or row.get("mean_toxicity") is None:
        return f"–{mark}"
    cell = f"{100 * (row['mean_toxicity'] / ref - 1):+.0f}%"
    se = row.get("delta_mean_toxicity_stderr")
    if se is not None:
        cell += f" ± {100 * se / ref:.0f}%"
        if abs(row["delta_mean_toxicity"]) > 2 * se:
            cell += " *"
    return cell + mark


def _toxicity(key: str) -> Any:
    return lambda r: with_stderr(r.get(key), r.get(f"{key}_stderr"))


# (header, cell, key that makes an optional column appear: shown only when some row has it,
# i.e. the runs measured or asked for it; None: always shown)
_COLUMNS = (
    ("exp. max toxicity", _toxicity("expected_max_toxicity"), None),
    ("toxicity prob.", _toxicity("toxicity_probability"), None),
    ("mean toxicity", _toxicity("mean_toxicity"), None),
    ("Δ mean tox. vs base", None, None),
    ("PPL (held-out)", lambda r: _fmt(r.get("perplexity"), 2), None),
    ("PPL (generations)", lambda r: _fmt(r.get("fluency_perplexity"), 2), "fluency_perplexity"),
    ("distinct-2", lambda r: _fmt(r.get("distinct_2")), "distinct_2"),
    ("detection AUROC", lambda r: _fmt(r.get("detection_auroc")), "detection_auroc"),
    ("utility", lambda r: _utility(r.get("utility")), "utility"),
    ("train time (s)", lambda r: _fmt(r.get("seconds"), 0), None),
    ("samples", lambda r: _fmt(r.get("train_samples")), None),
    ("oracle calls", lambda r: _fmt(r.get("oracle_calls")), None),
)


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """The paper-shaped table: rows = methods; toxicity (± its standard error over prompts),
    the change from base (± its paired standard error), fluency, diversity and time; an
    optional column only when some row has its value; notes below say what an empty cell
    or a missing error means."""
    base = next((r for r in rows if r["method"] == "base"), None)
    columns = [c for c in _COLUMNS if c[2] is None or any(c[2] in r for r in rows)]
    notes: list[str] = []
    lines = [
        "| method | " + " | ".join(h for h, _, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for r, name in zip(rows, row_names(rows)):
        cells = [_delta(r, base, notes) if cell is None else cell(r) for _, cell, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    legend = []
    if any(r.get("mean_toxicity_stderr") is not None for r in rows):
        legend.append("± one standard error over prompts (each prompt's completions are one unit).")
    if any("delta_mean_toxicity_stderr" in r for r in rows):
        legend.append(
            "Δ: relative to base ± the paired standard error of the per-prompt differences; "
            "`*`: the difference exceeds two of them."
        )
    old = [n for r, n in zip(rows, row_names(rows))
           if r.get("mean_toxicity") is not None and "mean_toxicity_stderr" not in r]  # fmt: skip
    if old:
        legend.append(
            f"No standard errors for {', '.join(old)}: evaluated before they were recorded."
        )
    legend += [f"({i}) {note}." for i, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n\n" + "".join(f"- {line}\n" for line in legend)
