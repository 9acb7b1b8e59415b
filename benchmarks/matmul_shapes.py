"""Decode-shaped fp32 matmuls, XLA:CPU (jitted JAX) vs PyTorch, same CPU, same run.

The floor under a GPT-2-small batch-32 decode step: every step multiplies a `[32, K]`
activation by each layer's weights and the LM head. This times those shapes alone (12
different weight matrices per shape, as in the 12 layers, so they stream from memory like
in a real step), both libraries on the same weights, plus a large square GEMM for the
machine's peak. It shows how much of transformers' step the matmuls alone take, i.e.
how far below it any implementation can go.

    python benchmarks/matmul_shapes.py [--out benchmarks/results/matmul_shapes.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _results import write_results

# (rows, in, out, copies): GPT-2 small's decode matmuls at batch 32, then a peak probe.
SHAPES = [
    (32, 768, 768, 12),  # attention q, k, v, o (x4 per layer)
    (32, 768, 3072, 12),  # mlp fc
    (32, 3072, 768, 12),  # mlp proj
    (32, 768, 50257, 1),  # LM head
    (2048, 2048, 2048, 1),  # large square GEMM: the machine's fp32 peak
]


def median_ms(fn, reps: int) -> float:
    """Median wall time of `fn()` in ms after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/matmul_shapes.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # [out, in] weights, the layout of the sampler's decode copies and of torch's Linear.
    dot = jax.jit(lambda x, ws: [jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))) for w in ws])
    rows = []
    for m, k, n, copies in SHAPES:
        weights = [rng.standard_normal((n, k), dtype=np.float32) for _ in range(copies)]
        x = rng.standard_normal((m, k), dtype=np.float32)
        x_j, w_j = jnp.asarray(x), [jnp.asarray(w) for w in weights]
        x_t, w_t = torch.from_numpy(x), [torch.from_numpy(w) for w in weights]
        reps = max(3, args.reps // (1 + m // 256))
        ours = median_ms(lambda: jax.block_until_ready(dot(x_j, w_j)), reps) / copies  # noqa: B023
        ref = median_ms(
            lambda: [torch.nn.functional.linear(x_t, w) for w in w_t],  # noqa: B023
            reps,
        )
        ref /= copies
        flop = 2 * m * k * n
        row = {
            "shape": f"[{m},{k}]x[{k},{n}]",
            "jax_ms": ours,
            "torch_ms": ref,
            "jax_gflops": flop / ours / 1e6,
            "torch_gflops": flop / ref / 1e6,
        }
        rows.append(row)
        print({key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()})
    result = {
        "setup": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_avg": os.getloadavg(),
            "dtype": "float32",
        },
        "shapes": rows,
    }
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
