"""`jaxdetox report RUN_DIR... [--out DIR]`: the results of runs as a table and plots.

Writes `DIR/report.md` (rows = methods: expected maximum toxicity, toxicity probability and
mean toxicity, each ± its standard error over prompts; the change of mean toxicity from the
base row ± its paired standard error, `*` past two of them, or a note saying why it is
empty; perplexity on held-out text and of the generations, distinct-2, detection and utility
when measured, training time, training samples drawn and oracle calls), `DIR/results.json`
(the same rows, the errors as `<figure>_stderr`) and PNG
plots (toxicity per iteration, toxicity vs perplexity, time per iteration by stage, and
toxicity / perplexity against λ when the runs sweep it; a λ sweep's directory stands for
its runs). DIR defaults to the first run directory. Run directories and DIR may be on
`gs://` (the report is written locally, then uploaded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxdetox.fileio import as_path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `report` subcommand."""
    p = subparsers.add_parser(
        "report", help="tables and plots from run directories", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("runs", nargs="+", type=as_path, help="run directories")
    p.add_argument("--out", type=as_path, default=None, help="where to write (default: first run)")
    p.set_defaults(func=run)


def write_report(runs: list[Path], out: Path) -> str:
    """Write report.md, results.json and the plots for `runs` into `out`; returns the table."""

    from jaxdetox import fileio
    from jaxdetox.evaluate.runs import collect

    rows, summaries = collect(runs)
    with fileio.local_dir(out) as local:  # matplotlib writes local files
        return _write(rows, summaries, Path(local))


def _write(rows: list, summaries: list, out: Path) -> str:
    import json

    from jaxdetox.evaluate import plots
    from jaxdetox.evaluate.runs import (
        iteration_time_markdown,
        nado_quality_markdown,
        results_markdown,
    )

    table = results_markdown(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    made = [
        plots.toxicity_per_iteration(summaries, out),
        plots.toxicity_vs_perplexity(rows, out),
        plots.stage_times(summaries, out),
        plots.iteration_times(summaries, out),
        plots.lambda_sweep(rows, out),
    ]
    images = "\n".join(f"![{p.stem}]({p.name})" for p in made if p is not None)
    runs_list = "\n".join(
        f"- `{s['run']}` ({s['method']}, {s['scheme']}, {s['placement']})" for s in summaries
    )
    times = iteration_time_markdown(summaries)
    times = f"## Iteration time\n\n{times}\n" if times else ""
    quality = nado_quality_markdown(summaries)
    quality = f"## NADO quality (held-out samples)\n\n{quality}\n" if quality else ""
    (out / "report.md").write_text(
        f"# Results\n\n{table}\n{times}{quality}Runs:\n{runs_list}\n\n{images}\n"
    )
    return table


def run(args: argparse.Namespace) -> int:
    """Collect the runs and write the report."""
    out = args.out or args.runs[0]
    try:
        table = write_report(args.runs, out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"wrote {out / 'report.md'}, {out / 'results.json'} and plots in {out}")
    return 0
