"""Oracle scoring throughput (texts/s): default oracle cold, through a cold and a warm cache,
and hatesonar when installed, side by side in one process (the CPU here is shared, so read
the ratios). Writes benchmarks/results/oracle_throughput.json.

    python benchmarks/oracle_throughput.py [--n 20000]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from _results import write_results

from jaxdetox import assets, oracles

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "oracles" / "toxic_benign.jsonl"


def make_texts(n):
    """n distinct ~20-word texts: a built-in prompt followed by a fixture sentence."""
    prompts = [r["text"] for r in assets.load_prompts()]
    endings = [json.loads(line)["text"] for line in FIXTURE.open()]
    return [
        f"{prompts[i % len(prompts)]} {endings[(i // len(prompts)) % len(endings)]} #{i}"
        for i in range(n)
    ]


def timed(oracle, texts):
    start = time.perf_counter()
    _, ok = oracle.score(texts)
    seconds = time.perf_counter() - start
    assert ok.all()
    return {"seconds": round(seconds, 3), "texts_per_second": round(len(texts) / seconds, 1)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    texts = make_texts(args.n)
    results = {"n_texts": len(texts), "mean_chars": sum(map(len, texts)) / len(texts)}
    results["default"] = timed(oracles.load("default"), texts)
    with tempfile.TemporaryDirectory() as tmp:
        cached = oracles.load("default", cache=Path(tmp) / "c.sqlite")
        results["default_cache_cold"] = timed(cached, texts)
        calls = cached.stats.calls
        results["default_cache_warm"] = timed(cached, texts)
        results["default_cache_warm"]["oracle_calls"] = cached.stats.calls - calls
    try:
        results["hatesonar"] = timed(oracles.load("hatesonar"), texts)
    except oracles.OracleUnavailableError as err:
        results["hatesonar"] = f"skipped: {err}"
    out = Path(__file__).parent / "results" / "oracle_throughput.json"
    write_results(out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
