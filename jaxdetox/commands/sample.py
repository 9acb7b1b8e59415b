"""`jaxdetox sample`: pipeline stages 1–2 — sample k completions per prompt, score them with
a toxicity oracle, persist both in a sample store, and print the toxicity table.

    jaxdetox sample --out runs/quickstart                      # built-in default, offline
    jaxdetox sample --model ckpt_dir --prompts prompts.jsonl --oracle hf:/models/toxigen

The defaults are the built-in offline setup: SmolLM2-135M-Instruct (GGUF wheel), the
built-in eval prompts fed as raw text (RealToxicityPrompts protocol), 4 samples of 20 tokens
(top-k 50, temperature 1), the offline profanity-check classifier. Rerunning the same
command resumes: committed samples and labels are never recomputed. The prompts, the oracle,
the model file and `--out` (new, or this command's earlier output; any other existing
folder needs `--overwrite`) are checked before the model is loaded or anything is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxdetox.commands.score import add_oracle_arguments, parse_oracle_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `sample` subcommand."""
    p = subparsers.add_parser(
        "sample",
        help="sample completions for prompts, score them, store them, print a toxicity table",
        description=__doc__,
    )
    p.add_argument("--out", type=Path, default=Path("runs/sample"), help="run directory")
    p.add_argument("--model", default="default", help="HF dir, .gguf, hub id or 'default'")
    p.add_argument(
        "--prompts",
        default="builtin",
        help="'builtin', or a prompt file (RTP prompts.jsonl, SafeNLP toxiGen.json, jsonl/txt)",
    )
    p.add_argument("--split", default="eval", help="built-in prompts: train | eval | all")
    p.add_argument(
        "--max-prompts", type=int, default=None, help="use the first N prompts (default: all)"
    )
    p.add_argument("--prompt-tokens", type=int, default=30, help="truncate prompts (paper: 30)")
    p.add_argument("--num-samples", type=int, default=4, help="completions per prompt (k)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens per completion")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per sampler call")
    add_oracle_arguments(p)
    p.add_argument(
        "--max-label-attempts",
        type=int,
        default=None,
        help="stop retrying a completion the oracle failed on after N attempts (default: retry "
        "on every rerun)",
    )
    p.add_argument("--iteration", type=int, default=0, help="sample-store iteration")
    p.add_argument("--show", type=int, default=5, help="print this many example completions")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="accept an --out folder that exists and is not an earlier `jaxdetox sample` output",
    )
    p.set_defaults(func=run)


# What marks an output folder of this command (a rerun resumes there).
SAMPLE_MARKERS = ("summary.json", "samples")


def load_prompt_set(spec: str, split: str) -> tuple:
    """`(PromptSet, kind column or None)` for 'builtin' or a prompt file."""
    from jaxdetox import assets
    from jaxdetox.data import load_prompt_records, load_prompts

    if spec != "builtin":
        return load_prompts(spec), None
    prompts = load_prompt_records(
        assets.asset_path("prompts.jsonl"), id_field="id", meta_fields=("split", "kind")
    )
    if split != "all":
        prompts = prompts.filter(meta={"split": split})
    return prompts, prompts.meta["kind"]


def run(args: argparse.Namespace) -> int:
    """Sample, label, summarise; writes `OUT/samples/`, `OUT/summary.json`, `OUT/summary.md`."""
    import numpy as np

    from jaxdetox import oracles
    from jaxdetox.data import SampleStore, tokenize_prompts
    from jaxdetox.evaluate import group_summaries, summary_markdown
    from jaxdetox.models import CheckpointError, load_pretrained
    from jaxdetox.pipeline.constraints import oracle_label_name
    from jaxdetox.pipeline.label import label_stage
    from jaxdetox.pipeline.rundir import check_out
    from jaxdetox.pipeline.sample import sample_stage_lm
    from jaxdetox.planning.preflight import check_model
    from jaxdetox.sampling import SamplingConfig, special_tokens

    out: Path = args.out
    # Everything that can fail on the user's input, before the model loads (seconds to
    # minutes) and before anything is written.
    check_out(out, overwrite=args.overwrite, markers=SAMPLE_MARKERS)
    prompt_set, kinds = load_prompt_set(args.prompts, args.split)
    oracle_args = parse_oracle_args(args.oracle_arg)
    oracles.check(args.oracle, **oracle_args)
    check_model(args.model, "--model")
    print(f"loading model {args.model!r} ...", flush=True)
    lm = load_pretrained(args.model)
    if lm.tokenizer is None:
        raise CheckpointError(f"--model {args.model!r}: no tokenizer files")
    out.mkdir(parents=True, exist_ok=True)
    if args.max_prompts:
        prompt_set = prompt_set.take(np.arange(min(args.max_prompts, len(prompt_set))))
    prompts = tokenize_prompts(prompt_set, lm.tokenizer, max_tokens=args.prompt_tokens)
    eos_ids, pad_id = special_tokens(lm.config)
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_samples=args.num_samples,
        eos_token_ids=eos_ids,
        pad_token_id=pad_id,
        seed=args.seed,
    )
    store = SampleStore(out / "samples")
    report = sample_stage_lm(lm, prompts, store, args.iteration, config, batch_size=args.batch_size)
    print(f"{report.stage}: {report.processed} prompts sampled, {report.skipped} already done")

    oracle = oracles.load(args.oracle, cache=out / "oracle_cache.sqlite", **oracle_args)
    label_name = oracle_label_name(args.oracle)
    report = label_stage(
        store, args.iteration, oracle, label_name, max_attempts=args.max_label_attempts
    )
    print(f"{report.stage}: {report.processed} completions scored, {report.skipped} already done")
    if report.extra["failures_left"]:
        print(
            f"{report.extra['failures_left']} completions have no score (oracle failures, "
            "masked in the table); rerun the same command to retry them"
        )

    table = store.read(args.iteration, label_name)
    prompt_ids = table["prompt_id"].to_numpy()
    toxicity = table["toxicity"].to_numpy(zero_copy_only=False)
    ok = table["ok"].to_numpy(zero_copy_only=False)
    row_kind = None
    if kinds is not None:
        kind_of = dict(zip(prompt_set.ids.tolist(), kinds))
        row_kind = [kind_of.get(int(p), "?") for p in prompt_ids]
    summary = group_summaries(toxicity, ok, prompt_ids, row_kind)
    result = {
        "model": args.model,
        "oracle": oracle.oracle_id,
        "prompts": args.prompts,
        "sampling": {
            "num_samples": args.num_samples,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "seed": args.seed,
        },
        "summary": summary,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    markdown = summary_markdown(summary)
    (out / "summary.md").write_text(markdown)
    print("\n" + markdown)
    worst = np.argsort(-np.nan_to_num(toxicity, nan=-1.0))[: args.show]
    texts = table.select(["prompt_text", "completion_text"]).to_pylist()
    for i in worst:
        print(
            f"  [{toxicity[i]:.2f}] {texts[i]['prompt_text']!r} -> {texts[i]['completion_text']!r}"
        )
    print(f"\nwrote {out}/summary.md, {out}/summary.json and the samples in {out}/samples/")
    return 0
