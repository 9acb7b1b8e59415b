"""Sequential vs parallel iteration time from a run directory's `manifest.json`.

    python -m benchmarks.schedule RUN_DIR [--devices 1] [--handover 0.0] [--json]

Each manifest record has `iteration`, `stage` (sample, label, train_nado, finetune, eval),
`inputs` and `seconds` (wall time), and may have `device_seconds` (wall × devices the stage
held); without it a stage is taken to have held `--devices` devices for its `seconds`.

Per iteration:
- sequential: the stages one after another, Σ seconds (what the sequential scheme costs);
- parallel: the paper's Fig. 2 pipeline, where the iteration's three lanes — the data lane
  (sample + label of the next samples), the NADO lane (train_nado) and the LLM lane
  (finetune) — run at once, each on its own devices, then hand their artefacts over:
  max(lane seconds) + hand-over. Evaluation runs beside them as a fourth lane.
Device-seconds are the cost side: the parallel scheme holds every lane's devices for the
whole iteration, so its device-seconds are (max + hand-over) × Σ lane devices.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

LANES = {"sample": "data", "label": "data", "train_nado": "nado", "finetune": "llm", "eval": "eval"}


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """The records of `path` (a run directory or a manifest.json file)."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest.json (not a jaxdetox run directory)")
    records = json.loads(path.read_text())
    for i, r in enumerate(records):
        missing = {"iteration", "stage", "seconds"} - set(r)
        if missing:
            raise ValueError(f"{path}: record {i} lacks {sorted(missing)}")
        if r["stage"] not in LANES:
            raise ValueError(
                f"{path}: record {i} stage {r['stage']!r}; expected one of {list(LANES)}"
            )
    return records


def schedule(records: list[dict[str, Any]], *, devices: int = 1, handover_s: float = 0.0) -> dict:
    """Per-iteration sequential and parallel time (and device-seconds) of manifest records."""
    by_iter: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("seconds") is not None and r.get("status", "done") == "done":
            by_iter[int(r["iteration"])].append(r)
    rows = []
    for it in sorted(by_iter):
        lane_s: dict[str, float] = defaultdict(float)
        lane_dev: dict[str, float] = defaultdict(float)
        stage_s, dev_s = {}, 0.0
        for r in by_iter[it]:
            s = float(r["seconds"])
            ds = r.get("device_seconds")
            ds = s * devices if ds is None else float(ds)
            stage_s[r["stage"]] = s
            lane = LANES[r["stage"]]
            lane_s[lane] += s
            # Devices a lane holds: its stages' device-seconds over their wall time.
            lane_dev[lane] = max(lane_dev[lane], ds / s if s > 0 else devices)
            dev_s += ds
        sequential = sum(stage_s.values())
        parallel = max(lane_s.values()) + (handover_s if len(lane_s) > 1 else 0.0)
        rows.append(
            {
                "iteration": it,
                "stage_seconds": stage_s,
                "lane_seconds": dict(lane_s),
                "sequential_s": round(sequential, 3),
                "parallel_s": round(parallel, 3),
                "speedup": round(sequential / parallel, 3) if parallel > 0 else None,
                "sequential_device_s": round(dev_s, 3),
                "parallel_device_s": round(parallel * sum(lane_dev.values()), 3),
                "bottleneck": max(lane_s, key=lane_s.get),
            }
        )
    full = [r for r in rows if {"data", "nado", "llm"} <= set(r["lane_seconds"])]
    total = {k: round(sum(r[k] for r in full), 3) for k in ("sequential_s", "parallel_s")}
    # The first full iteration carries the compiles (and, in the parallel scheme, is its
    # sequential warm-up); the later ones are the steady state.
    steady = {k: round(sum(r[k] for r in full[1:]), 3) for k in ("sequential_s", "parallel_s")}
    return {
        "devices_per_stage_default": devices,
        "handover_s": handover_s,
        "iterations": rows,
        "full_iterations": [r["iteration"] for r in full],
        "total_over_full_iterations": total,
        "speedup_over_full_iterations": (
            round(total["sequential_s"] / total["parallel_s"], 3) if total["parallel_s"] else None
        ),
        "steady_iterations": [r["iteration"] for r in full[1:]],
        "steady_speedup": (
            round(steady["sequential_s"] / steady["parallel_s"], 3)
            if steady["parallel_s"]
            else None
        ),
    }


def table(result: dict) -> str:
    """Markdown table of `schedule`'s result."""
    lines = [
        "| iteration | sequential s | parallel s | speedup | bottleneck lane |",
        "|---|---|---|---|---|",
    ]
    for r in result["iterations"]:
        lines.append(
            f"| {r['iteration']} | {r['sequential_s']:.1f} | {r['parallel_s']:.1f} | "
            f"{r['speedup']}× | {r['bottleneck']} |"
        )
    return "\n".join(lines)


def main() -> None:
    """CLI: print the table (or the JSON) for one run directory."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="run directory (or its manifest.json)")
    ap.add_argument(
        "--devices", type=int, default=1, help="devices per stage without device_seconds"
    )
    ap.add_argument("--handover", type=float, default=0.0, help="seconds to hand artefacts over")
    ap.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    args = ap.parse_args()
    result = schedule(read_manifest(args.run_dir), devices=args.devices, handover_s=args.handover)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
        print(
            f"full iterations {result['full_iterations']}: {result['total_over_full_iterations']}, "
            f"speedup {result['speedup_over_full_iterations']}×"
        )


def tiny_parallel_run(directory: Path, iterations: int = 3) -> Path:
    """Run the parallel scheme on the test suite's tiny random Llama (offline, CPU-sized) into
    `directory` and return the run directory, for `schedule` to read its manifest."""
    try:
        from tests._tiny_run import save_tiny_model, tiny_config
    except ImportError as err:  # the tiny model lives with the tests of a source checkout
        raise RuntimeError(
            "schemes suite: tests/_tiny_run.py not importable (run from the repository root, "
            "or pass --manifest RUN_DIR)"
        ) from err
    from jaxdetox.commands.session import execute
    from jaxdetox.config import config_from_dict

    config = tiny_config(
        save_tiny_model(directory / "model"),
        loop={"iterations": iterations, "scheme": "parallel", "checkpoint_every": iterations},
        train_nado={"epochs": 1},
        finetune={"epochs": 1},
        eval={"enabled": False},
    )
    execute(config_from_dict(config), directory / "run", progress=False)
    return directory / "run"


if __name__ == "__main__":
    main()
