"""The benchmark suite: jaxdetox against the PyTorch way of doing the same work, and against
the hardware limit, in one command.

    python -m benchmarks.run [--quick] [--only NAME[,NAME]] [--out FILE] [--manifest RUN_DIR]

Suites (`--only` names): `train_step` (SFT step vs transformers, share of the matmul peak),
`joint` (`joint_step` vs its parts and vs the authors'-form PyTorch update, time and peak
memory), `sampling` (decode ratios by mode, RTP-style end-to-end, NADO-guided overhead),
`kl_memory` (compiled temp memory of the chunked regularised loss vs chunked CE),
`schemes` (sequential vs parallel iteration time from a run's manifest; a tiny parallel run
unless `--manifest` is given), `accelerator` (MFU of a ~1B Llama train step; skipped on CPU).

Every ratio is measured in this run, on this machine: both sides alternate after a warm-up,
the median of the repetitions is used, compile time is reported apart, and every repetition
is kept with the 1-minute load average. The JSON (`--out`) has the machine, versions, device
kind, each suite's figures, and a `summary` of the goal ratios (`SUMMARY_KEYS`); a markdown
table of goal / measured / met is printed. `--quick` takes about 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._results import load_avg, machine_info, write_results

# summary key -> (comparison, goal). Ratios are ours / theirs for times and memory, theirs /
# ours (a speedup) for the sampler; `mfu` and the matmul-peak share are fractions of a peak.
GOALS: dict[str, tuple[str, float]] = {
    "train_step_time_vs_hf": ("<=", 0.9),
    "train_step_matmul_peak_share": (">=", 0.7),
    "joint_step_time_vs_torch": ("<=", 0.8),
    "joint_step_peak_memory_vs_torch": ("<=", 0.5),
    "joint_step_vs_sum_of_parts": ("<=", 1.1),
    "sampler_rtp_vs_hf": (">=", 2.0),
    "sampler_greedy_vs_hf": (">=", 0.95),
    "sampler_top_k50_vs_hf": (">=", 1.2),
    "sampler_top_p_vs_hf": (">=", 1.8),
    "kl_peak_memory_vs_ce": ("<=", 1.2),
    "mfu": (">=", 0.45),
}
SUMMARY_KEYS = tuple(GOALS)
SUITES = ("train_step", "joint", "sampling", "kl_memory", "schemes", "accelerator")
SUITE_SUMMARY_KEYS = {
    "train_step": ("train_step_time_vs_hf", "train_step_matmul_peak_share"),
    "joint": (
        "joint_step_time_vs_torch",
        "joint_step_peak_memory_vs_torch",
        "joint_step_vs_sum_of_parts",
    ),
    "sampling": (
        "sampler_rtp_vs_hf",
        "sampler_greedy_vs_hf",
        "sampler_top_k50_vs_hf",
        "sampler_top_p_vs_hf",
    ),
    "kl_memory": ("kl_peak_memory_vs_ce",),
    "schemes": (),
    "accelerator": ("mfu",),
}
SCHEMA_VERSION = 1


class Skipped(Exception):
    """A suite that does not apply here (the reason is recorded)."""


# ----------------------------------------------------------------------------- suites
# Each suite returns (figures, {summary key: value}).


def suite_train_step(args: argparse.Namespace) -> tuple[dict, dict]:
    """SFT step vs HF (GPT-2 small, B=8, T=128, fp32) and its share of the matmul peak."""
    from benchmarks import train_step_bench

    sft = train_step_bench.run_section("sft", reps=args.reps, profile=args.profile)
    summary = {
        "train_step_time_vs_hf": sft["time_ratio_ours_over_hf"],
        "train_step_matmul_peak_share": sft["ours_mfu"],
    }
    return {"sft": sft}, summary


def suite_joint(args: argparse.Namespace) -> tuple[dict, dict]:
    """`joint_step` vs the sum of its parts, and vs the authors'-form PyTorch update."""
    from benchmarks import joint_vs_torch, train_step_bench

    parts = train_step_bench.run_section("joint", reps=args.reps, profile=args.profile)
    gc.collect()
    torch_cmp = joint_vs_torch.compare(reps=args.reps)
    summary = {
        "joint_step_vs_sum_of_parts": parts["joint_over_parts"],
        "joint_step_time_vs_torch": torch_cmp["time_ratio_ours_over_torch"],
        "joint_step_peak_memory_vs_torch": torch_cmp["peak_memory_ratio_ours_over_torch"],
    }
    return {"vs_parts": parts, "vs_torch": torch_cmp}, summary


def suite_sampling(args: argparse.Namespace) -> tuple[dict, dict]:
    """Sampler vs transformers `generate`: decode ratios, RTP end to end, NADO overhead."""
    from benchmarks import sampling_bench

    figures = sampling_bench.run(
        reps=args.reps,
        rtp_prompts=2 if args.quick else 32,
        modes=("greedy", "top_k50", "top_p") if args.quick else tuple(sampling_bench.MODES),
    )
    decode = figures["decode"]
    summary = {
        "sampler_rtp_vs_hf": figures["rtp"]["speedup"],
        "sampler_greedy_vs_hf": decode["greedy"]["decode_speedup"],
        "sampler_top_k50_vs_hf": decode["top_k50"]["decode_speedup"],
        "sampler_top_p_vs_hf": decode["top_p"]["decode_speedup"],
    }
    return figures, summary


def suite_kl_memory(args: argparse.Namespace) -> tuple[dict, dict]:
    """Compiled temp memory: chunked regularised loss vs chunked CE vs naive, V = 32k, 128k."""
    from benchmarks import kl_memory

    by_vocab = {str(v): kl_memory.measure(8, 512, 2048, v, naive=True) for v in (32000, 128256)}
    ratio = max(r["ratio_at_default_chunk_float32"] for r in by_vocab.values())
    figures = {"B_T_D": [8, 512, 2048], "by_vocab": by_vocab, "notes": kl_memory.NOTES}
    return figures, {"kl_peak_memory_vs_ce": ratio}


def suite_schemes(args: argparse.Namespace) -> tuple[dict, dict]:
    """Sequential vs parallel iteration time from a manifest (a tiny parallel run if none)."""
    from benchmarks import schedule

    source = args.manifest
    with tempfile.TemporaryDirectory() as tmp:
        if source is None:
            start = time.perf_counter()
            source = schedule.tiny_parallel_run(Path(tmp))
            run_s = time.perf_counter() - start
        else:
            run_s = None
        result = schedule.schedule(schedule.read_manifest(source), handover_s=args.handover)
    figures = {
        "manifest": "tiny parallel run (tests/_tiny_run.py)"
        if args.manifest is None
        else str(source),
        "tiny_run_s": run_s,
        **result,
        "table": schedule.table(result),
    }
    return figures, {}


def suite_accelerator(args: argparse.Namespace) -> tuple[dict, dict]:
    """MFU of a ~1B Llama train step; only on an accelerator."""
    import jax

    if jax.default_backend() == "cpu":
        raise Skipped(
            "no accelerator (JAX backend cpu): the ~1B Llama MFU needs a GPU/TPU; the other "
            "suites already ran on this CPU"
        )
    from benchmarks import mfu

    figures = mfu.train_step_mfu(reps=args.reps)
    return {"train_step_mfu": figures}, {"mfu": figures["mfu"]}


SUITE_FUNCTIONS: dict[str, Callable[[argparse.Namespace], tuple[dict, dict]]] = {
    "train_step": suite_train_step,
    "joint": suite_joint,
    "sampling": suite_sampling,
    "kl_memory": suite_kl_memory,
    "schemes": suite_schemes,
    "accelerator": suite_accelerator,
}


# ----------------------------------------------------------------------------- report


def goal_met(key: str, value: float | None) -> bool | None:
    """Whether `value` meets the goal of summary `key` (None when not measured)."""
    if value is None:
        return None
    op, goal = GOALS[key]
    return value <= goal if op == "<=" else value >= goal


def goals_table(summary: dict[str, float | None]) -> str:
    """Markdown table: summary key, goal, measured, met / missed / not measured."""
    rows = ["| figure | goal | measured | |", "|---|---|---|---|"]
    for key in SUMMARY_KEYS:
        op, goal = GOALS[key]
        value = summary.get(key)
        met = goal_met(key, value)
        word = "not measured" if met is None else ("met" if met else "**missed**")
        shown = "—" if value is None else f"{value:.3g}"
        rows.append(f"| `{key}` | {'≤' if op == '<=' else '≥'} {goal} | {shown} | {word} |")
    return "\n".join(rows)


def validate(report: dict) -> None:
    """Raise ValueError naming the first field of `report` that breaks the output schema."""

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ValueError(f"benchmark report: {what}")

    for key in ("schema_version", "command", "quick", "machine", "suites", "summary", "goals"):
        need(key in report, f"missing top-level key {key!r}")
    for key in ("cpu_count", "load_avg_1_5_15", "jax", "backend", "device_kind"):
        need(key in report["machine"], f"machine lacks {key!r}")
    need(
        set(report["summary"]) == set(SUMMARY_KEYS),
        f"summary keys {sorted(report['summary'])}; expected exactly {sorted(SUMMARY_KEYS)}",
    )
    for key, value in report["summary"].items():
        need(value is None or isinstance(value, (int, float)), f"summary[{key!r}] = {value!r}")
        goal = report["goals"].get(key)
        need(isinstance(goal, dict) and {"goal", "value", "met"} <= set(goal), f"goals[{key!r}]")
    for name, suite in report["suites"].items():
        need(name in SUITES, f"unknown suite {name!r}")
        need("seconds" in suite and "load_avg" in suite, f"suites[{name!r}] lacks seconds/load_avg")
        kinds = [k for k in ("figures", "skipped", "error") if k in suite]
        need(len(kinds) == 1, f"suites[{name!r}] needs one of figures / skipped / error")


def run_suites(args: argparse.Namespace) -> dict:
    """Run the chosen suites in order; the report (written to `args.out` after each suite)."""
    previous = None
    if args.merge and args.out and Path(args.out).exists():
        import json

        previous = json.loads(Path(args.out).read_text())
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
        "reps": args.reps,
        "machine": machine_info(),
        "suites": {},
        "summary": dict.fromkeys(SUMMARY_KEYS),
        "goals": {},
    }
    if previous is not None:  # keep the other suites' figures and summary values
        report["suites"] = {k: v for k, v in previous["suites"].items() if k not in args.only}
        report["summary"].update(
            {k: v for k, v in previous["summary"].items() if k in report["summary"]}
        )
        for name in args.only:  # what the re-run suites report is measured afresh
            for key in SUITE_SUMMARY_KEYS[name]:
                report["summary"][key] = None
        report["merged"] = previous.get("merged", []) + [
            {"command": previous["command"], "started": previous["started"],
             "machine": previous["machine"], "suites": list(report["suites"])}
        ]  # fmt: skip
    for name in args.only:
        print(f"== {name}", flush=True)
        load_start, start = load_avg(), time.perf_counter()
        entry: dict[str, Any] = {}
        try:
            figures, summary = SUITE_FUNCTIONS[name](args)
            entry["figures"] = figures
            report["summary"].update(summary)
        except Skipped as why:
            entry["skipped"] = str(why)
        except Exception as err:  # a broken suite must not lose the others' figures
            traceback.print_exc()
            entry["error"] = f"{type(err).__name__}: {err}"
        entry["seconds"] = round(time.perf_counter() - start, 1)
        entry["load_avg"] = [load_start, load_avg()]
        report["suites"][name] = entry
        gc.collect()
        finish(report)
        if args.out:
            write_results(args.out, report)
    return report


def finish(report: dict) -> None:
    """Fill `goals` and `table` from `summary`, and check the schema."""
    report["goals"] = {
        key: {
            "goal": f"{GOALS[key][0]} {GOALS[key][1]}",
            "value": report["summary"].get(key),
            "met": goal_met(key, report["summary"].get(key)),
        }
        for key in SUMMARY_KEYS
    }
    report["machine"]["load_avg_end"] = load_avg()
    report["table"] = goals_table(report["summary"])
    validate(report)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repetitions, fewer RTP prompts/modes")
    ap.add_argument("--only", default=",".join(SUITES), help=f"comma-separated of {SUITES}")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/suite.json"))
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3 quick, 5)")
    ap.add_argument("--manifest", type=Path, default=None, help="run dir for the schemes suite")
    ap.add_argument("--handover", type=float, default=0.0, help="schemes: hand-over seconds")
    ap.add_argument("--profile", action="store_true", help="per-op profiles in the train suites")
    ap.add_argument(
        "--merge", action="store_true", help="re-run the --only suites inside an existing --out"
    )
    args = ap.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in SUITES]
    if unknown:
        ap.error(f"--only {unknown}: expected names from {SUITES}")
    if args.reps is None:
        args.reps = 3 if args.quick else 5
    return args


def main(argv: list[str] | None = None) -> int:
    """Run, write the JSON, print the table."""
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # fp32 against fp32 torch
    args = parse_args(argv)
    report = run_suites(args)
    print(report["table"])
    print(
        f"load average {report['machine']['load_avg_1_5_15']} at start, "
        f"{report['machine']['load_avg_end']} at end, on {report['machine']['cpu_count']} CPUs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
