"""Choose the NADO recipe by measurement on training prompts only (experiments/README.md).

    python experiments/selection/choose_nado.py --out runs/select [--only NAME ...] [--list]

Every variant is the `nado_decoding` baseline of `nado_decoding.yaml` (131 of the 175 toxic
training prompts sampled, 44 other training prompts to evaluate guided decoding on) with a
few overrides. The first variant samples and labels; the others with the same sampling adopt
its samples and labels (`RunDir.adopt`), so every NADO is trained on the same samples and
every row differs only in its NADO. Writes `OUT/report.md` (paired Δ vs base with standard
errors) and `OUT/selection.json` (each variant's overrides, guided-decoding toxicity and
the held-out NADO quality of its train_nado stage).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).parent
CONFIG = HERE / "nado_decoding.yaml"

# name -> overrides. The first one of each sampling setting samples; the rest adopt.
F = ["nado.head=factored", "nado.bias_init=label_mean"]
HEAD_ONLY = ["train_nado.optimizer.trainable=[^head\\.]"]
SCREEN = ["eval.enabled=false"]  # NADO quality only (no guided evaluation): a cheap screen
VARIANTS: dict[str, list[str]] = {
    "linear": [],
    "factored": F,
    "shared_factored": [*F, "nado.variant=shared", "train_nado.optimizer.trainable=[]"],
    "factored_alpha4": [*F, "baseline.alpha=4.0"],
    "factored_k8": [*F, "sampling.num_samples=8"],
    "factored_alpha8": [*F, "baseline.alpha=8.0"],
    "shared_factored_alpha4": [*F, "nado.variant=shared", "train_nado.optimizer.trainable=[]",
                               "baseline.alpha=4.0"],
    "factored_k8_alpha4": [*F, "sampling.num_samples=8", "baseline.alpha=4.0"],
    # screens: held-out NADO quality only
    "s_linear_bias": ["nado.bias_init=label_mean", *SCREEN],
    "s_factored_head_only": [*F, *HEAD_ONLY, *SCREEN],
    "s_factored_head_only_lr1e-3": [*F, *HEAD_ONLY, "train_nado.head_learning_rate=1e-3", *SCREEN],
    "s_factored_r16_head_only": [*F, "nado.head_rank=16", *HEAD_ONLY, *SCREEN],
    "s_factored_lr3e-5": [*F, "train_nado.optimizer.learning_rate=3e-5", *SCREEN],
    "s_factored_wd": [*F, "train_nado.optimizer.weight_decay=0.1", *SCREEN],
    "s_shared_factored": [*F, "nado.variant=shared", "train_nado.optimizer.trainable=[]", *SCREEN],
    "s_shared_linear_bias": ["nado.variant=shared", "nado.bias_init=label_mean",
                             "train_nado.optimizer.trainable=[]", *SCREEN],
}  # fmt: skip
SHARED_STAGES = ((1, "sample"), (1, "label"))


def sampling_key(overrides: list[str]) -> tuple[str, ...]:
    """Overrides that change the samples (variants that agree on them share samples)."""
    return tuple(o for o in overrides if o.startswith(("sampling.", "prompts.", "seed=")))


def run_variant(name: str, overrides: list[str], out: Path, donors: dict) -> Path:
    """Run (or resume) one variant in `out/name`, adopting samples from a donor run."""
    from jaxdetox.commands.session import execute, open_run, resolve_run_config
    from jaxdetox.pipeline.rundir import RunDir

    key = sampling_key(overrides)
    run_dir = out / name
    extra = [] if key not in donors else ["eval.base=false"]
    config = resolve_run_config(str(CONFIG), run_dir, overrides + extra)
    run = open_run(config, run_dir)
    if key in donors:
        for iteration, stage in SHARED_STAGES:
            run.adopt(RunDir(donors[key]), iteration, stage)
    else:
        donors[key] = run_dir
    execute(config, run_dir, progress=True)
    return run_dir


def summary(run_dir: Path) -> dict:
    """Guided-decoding toxicity and NADO quality of a finished variant."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    out: dict = {}
    for record in manifest:
        if record["stage"] == "train_nado":
            out["nado_quality"] = record["outputs"].get("nado_quality")
            out["validation"] = record["outputs"].get("validation")
            out["nado_seconds"] = record.get("seconds")
        if record["stage"] == "eval" and record["iteration"] == 1:
            o = record["outputs"]
            out |= {k: o.get(k) for k in ("mean_toxicity", "mean_toxicity_stderr",
                                          "expected_max_toxicity", "toxicity_probability")}  # fmt: skip
        if record["stage"] == "eval" and record["iteration"] == 0:
            out["base_mean_toxicity"] = record["outputs"].get("mean_toxicity")
    return out


def main() -> None:
    """Run the selected variants and write the report and `selection.json`."""
    from jaxdetox.commands.report import write_report
    from jaxdetox.commands.session import setup_logging

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/select"))
    p.add_argument("--only", nargs="*", default=None, help="variant names (default: all)")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    args = p.parse_args()
    if args.list:
        for name, overrides in VARIANTS.items():
            print(f"{name}: {' '.join(overrides) or '(the config as it is)'}")
        return
    setup_logging()
    names = args.only or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    donors: dict = {}
    # The first variant of every sampling setting must run first: it samples for the others.
    first = [n for n in VARIANTS if n in names or sampling_key(VARIANTS[n]) == ()][:1]
    ordered = first + [n for n in names if n not in first]
    runs = [run_variant(n, VARIANTS[n], args.out, donors) for n in ordered]
    write_report(runs, args.out)
    # results.json: the base row and one nado_decoding row per evaluated run.
    rows = {r["run"]: r for r in json.loads((args.out / "results.json").read_text())
            if r["method"] == "nado_decoding"}  # fmt: skip
    results = {}
    for name, run_dir in zip(ordered, runs):
        row = rows.get(str(run_dir), {})
        keep = ("delta_mean_toxicity", "delta_mean_toxicity_stderr")
        results[name] = {"overrides": VARIANTS[name], **summary(run_dir),
                         **{k: row.get(k) for k in keep}}  # fmt: skip
    (args.out / "selection.json").write_text(json.dumps(results, indent=2) + "\n")
    table = selection_table(results)
    (args.out / "selection.md").write_text(table + "\n")
    print(table)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def selection_table(results: dict) -> str:
    """Markdown: guided-decoding toxicity (Δ vs base ± paired SE) and NADO quality per variant."""
    lines = [
        "| variant | mean tox. (guided) | Δ vs base | held-out BCE | constant BCE | AUROC | "
        "ECE | vocab coverage | NADO s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        q = r.get("nado_quality") or {}
        delta = r.get("delta_mean_toxicity")
        base = r.get("base_mean_toxicity") or next(
            (x["base_mean_toxicity"] for x in results.values() if x.get("base_mean_toxicity")), None
        )
        rel = "–"
        if delta is not None and base:
            se = r.get("delta_mean_toxicity_stderr")
            rel = f"{100 * delta / base:+.0f} %" + (f" ± {100 * se / base:.0f} %" if se else "")
        lines.append(
            f"| {name} | {_fmt(r.get('mean_toxicity'))} ± {_fmt(r.get('mean_toxicity_stderr'))} "
            f"| {rel} | {_fmt(q.get('heldout_bce'), 4)} | {_fmt(q.get('constant_bce'), 4)} "
            f"| {_fmt(q.get('auroc'))} | {_fmt(q.get('ece'))} | {_fmt(q.get('vocab_coverage'))} "
            f"| {_fmt(r.get('nado_seconds'), 0)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
