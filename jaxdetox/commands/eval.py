"""`jaxdetox eval MODEL --out DIR [key=value ...]`: the evaluation stage on any checkpoint.

MODEL is an HF checkpoint dir, a `.gguf` file, `default` (the built-in SmolLM2) or a run
directory (its `final/model`). Samples `eval.num_samples` completions for each held-out prompt
(`prompts.*` choose the prompt set), scores them with the oracle (`oracle.*`), and writes the
RTP metrics per prompt group, distinct-n and perplexities to `DIR/report.md`,
`DIR/results.json` and the manifest. Rerunning resumes.

    jaxdetox eval default --out runs/eval-base eval.num_samples=25
    jaxdetox eval runs/demo/run --out runs/eval-demo
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` subcommand."""
    p = subparsers.add_parser(
        "eval", help="RTP toxicity, perplexity and diversity of a checkpoint", description=__doc__
    )
    p.add_argument("model", help="HF dir, .gguf, 'default', or a jaxdetox run directory")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--out", type=Path, required=True, help="evaluation directory")
    p.add_argument(
        "--method",
        default=None,
        help="row name in the report (default: the run's method, or 'model')",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="accept an --out folder that exists and is not a jaxdetox run directory",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _resolve_model(model: str) -> tuple[str, str | None]:
    """`(model path, method)`: a run directory stands for its final LLM and its method."""
    import yaml

    from jaxdetox.pipeline.rundir import RunDirError

    path = Path(model)
    if (path / "manifest.json").exists():
        final = path / "final" / "model"
        if not final.exists():
            raise RunDirError(f"{path}: run directory without final/model (unfinished?)")
        saved = path / "config.yaml"
        method = yaml.safe_load(saved.read_text()).get("method") if saved.exists() else None
        return str(final), method
    return model, None


def run(args: argparse.Namespace) -> int:
    """Check the inputs, evaluate the model and write the report."""
    from jaxdetox.commands.report import write_report
    from jaxdetox.commands.session import (
        open_run,
        resolve_run_config,
        setup_logging,
        undo_failed_start,
    )
    from jaxdetox.config import load_config
    from jaxdetox.pipeline.evaluation import evaluate
    from jaxdetox.pipeline.experiment import Experiment
    from jaxdetox.pipeline.rundir import check_out
    from jaxdetox.planning.preflight import check_run

    model, run_method = _resolve_model(args.model)
    method = args.method or run_method or "model"
    overrides = [f"model.path={model}", f"method={method}", "name=eval", *args.overrides]
    check_out(args.out, overwrite=args.overwrite)
    if (args.out / "config.yaml").exists():
        config = resolve_run_config(None, args.out, overrides, executes=False)
    else:
        config = load_config(None, overrides, executes=False)
    check_run(config, executes=False)  # before anything is written into --out
    setup_logging()
    with undo_failed_start(args.out):
        run_dir = open_run(config, args.out)
        evaluate(Experiment(config, run_dir, progress=not args.no_progress), 0)
        run_dir.close()
    print(write_report([args.out], args.out))
    print(f"wrote {args.out / 'report.md'} and {args.out / 'results.json'}")
    return 0
