"""Peak temporary memory of the chunked regularised LM loss vs plain chunked CE vs naive.

Compiles (does not run) `value_and_grad` of each loss w.r.t. the student's hidden states and
LM head at Llama-3 vocabulary size and reads XLA's `memory_analysis()`; then checks at a small
size that the chunked values and gradients equal the naive full-logits form.

    python -m benchmarks.kl_memory [--batch 8 --length 512 --dim 2048 --vocab 32000 128256]

Writes benchmarks/results/kl_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks._results import write_results
from jaxdetox import losses
from jaxdetox.losses import reference

RESULTS = Path(__file__).parent / "results" / "kl_memory.json"
LAMBDA = 0.5  # any non-zero λ; memory does not depend on it


def reg_loss_fn(chunk_size: int | None):
    """Scalar Σ nll + λ·Σ kl as a function of the student (h, w)."""

    def fn(h, w, h_ref, w_ref, h_nado, w_nado, b_nado, targets, mask):
        args = (h, (w, None), h_ref, (w_ref, None), h_nado, (w_nado, b_nado), targets, mask)
        if chunk_size is None:
            out = reference.regularized_lm_loss_naive(*args)
        else:
            out = losses.regularized_lm_loss(*args, chunk_size=chunk_size)
        return out.nll_bt.sum() + LAMBDA * out.kl_bt.sum()

    return fn


def ce_loss_fn(chunk_size: int | None):
    """Scalar Σ nll (plain cross-entropy) as a function of (h, w), same argument list."""

    def fn(h, w, h_ref, w_ref, h_nado, w_nado, b_nado, targets, mask):
        del h_ref, w_ref, h_nado, w_nado, b_nado
        if chunk_size is None:
            return reference.naive_nll(h, (w, None), targets, mask).sum()
        return losses.chunked_nll(h, (w, None), targets, mask, chunk_size=chunk_size).sum()

    return fn


def shapes(b: int, t: int, d: int, v: int, dtype: jnp.dtype) -> tuple:
    hid = jax.ShapeDtypeStruct((b, t, d), dtype)
    head = jax.ShapeDtypeStruct((v, d), dtype)
    return (
        hid,
        head,
        hid,
        head,
        hid,
        head,
        jax.ShapeDtypeStruct((v,), dtype),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
        jax.ShapeDtypeStruct((b, t), jnp.float32),
    )


def compiled_memory(fn, args: tuple) -> dict:
    """Compile value_and_grad(fn) w.r.t. (h, w) and return XLA's memory analysis in bytes."""
    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
    mem = compiled.memory_analysis()
    return {
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "compile_s": round(time.perf_counter() - start, 2),
    }


def check_equal_to_naive(chunk_size: int = 16) -> dict:
    """Max |chunked − naive| of loss and grads (h, w) at a small size with B·T % chunk ≠ 0."""
    b, t, d, v = 3, 13, 32, 1000
    keys = jax.random.split(jax.random.key(0), 9)
    h, h_ref, h_nado = (jax.random.normal(k, (b, t, d)) for k in keys[:3])
    w, w_ref, w_nado = (jax.random.normal(k, (v, d)) / d**0.5 for k in keys[3:6])
    b_nado = jax.random.normal(keys[6], (v,))
    targets = jax.random.randint(keys[7], (b, t), 0, v)
    mask = (jax.random.uniform(keys[8], (b, t)) > 0.2).astype(jnp.float32)
    args = (h, w, h_ref, w_ref, h_nado, w_nado, b_nado, targets, mask)
    out = {}
    for name, chunked, naive in (
        ("regularized", reg_loss_fn(chunk_size), reg_loss_fn(None)),
        ("cross_entropy", ce_loss_fn(chunk_size), ce_loss_fn(None)),
    ):
        (lc, gc), (ln, gn) = (
            jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(*args) for f in (chunked, naive)
        )
        out[name] = {
            "loss_abs_diff": float(abs(lc - ln)),
            "loss_rel_diff": float(abs(lc - ln) / abs(ln)),
            "grad_h_max_abs_diff": float(abs(gc[0] - gn[0]).max()),
            "grad_w_max_abs_diff": float(abs(gc[1] - gn[1]).max()),
        }
    out["shape"] = {"B": b, "T": t, "D": d, "V": v, "chunk_size": chunk_size}
    return out


def measure(
    b: int,
    t: int,
    d: int,
    v: int,
    *,
    chunks: tuple[int, ...] | None = None,
    dtypes: tuple[str, ...] = ("float32",),
    naive: bool = True,
) -> dict:
    """Compiled temp memory of the chunked regularised loss, chunked CE and (with `naive`)
    the full-logits forms at one shape; `chunks` default to `losses.default_chunk_size(d)`."""
    default_chunk = losses.default_chunk_size(d)
    chunks = chunks or (default_chunk,)
    report: dict = {
        "shape": {"B": b, "T": t, "D": d, "V": v},
        "bytes_of_one_btv_float32": b * t * v * 4,
        "bytes_of_one_vd_float32": v * d * 4,
        "default_chunk_size": default_chunk,
        "rows": [],
        "naive": {},
    }
    for dtype_name in dtypes:
        sds = shapes(b, t, d, v, jnp.dtype(dtype_name))
        if naive:
            report["naive"][dtype_name] = {
                "naive_regularized": compiled_memory(reg_loss_fn(None), sds),
                "naive_cross_entropy": compiled_memory(ce_loss_fn(None), sds),
            }
        for c in chunks:
            reg = compiled_memory(reg_loss_fn(c), sds)
            ce = compiled_memory(ce_loss_fn(c), sds)
            ratio = reg["temp_bytes"] / ce["temp_bytes"]
            report["rows"].append(
                {
                    "dtype": dtype_name,
                    "chunk_size": c,
                    "chunked_regularized": reg,
                    "chunked_cross_entropy": ce,
                    "temp_ratio_regularized_over_ce": round(ratio, 4),
                }
            )
            print(
                f"V={v} {dtype_name} chunk={c}: reg temp {reg['temp_bytes'] / 2**30:.3f} GiB, "
                f"CE temp {ce['temp_bytes'] / 2**30:.3f} GiB, ratio {ratio:.3f}",
                flush=True,
            )
    default = [
        r for r in report["rows"] if r["chunk_size"] == default_chunk and r["dtype"] == "float32"
    ]
    if default:
        report["ratio_at_default_chunk_float32"] = default[0]["temp_ratio_regularized_over_ce"]
    return report


NOTES = [
    "temp = XLA temporaries; the float32 [V, D] head gradient accumulated over chunks is "
    "one of them (bytes_of_one_vd_float32), [chunk, V] blocks are the rest.",
    "Default chunk = losses.default_chunk_size(D).",
    "bfloat16 rows are XLA:CPU specific: CPU has no native bf16 GEMM, so the compiler keeps "
    "float32/transposed copies of the [V, D] heads; the student head is upcast to float32 "
    "on purpose (its gradient is summed over chunks in float32).",
]


def main() -> None:
    """Run the comparison and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--no-naive", action="store_true", help="skip compiling the naive forms")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    report = {
        "what": "XLA compiled memory_analysis() of jit(value_and_grad wrt student h, W)",
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "host": platform.node(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "by_vocab": {
            str(v): measure(
                args.batch,
                args.length,
                args.dim,
                v,
                chunks=tuple(args.chunks),
                dtypes=tuple(args.dtypes),
                naive=not args.no_naive,
            )  # fmt: skip
            for v in args.vocab
        },
        "notes": NOTES,
        "equal_to_naive": check_equal_to_naive(),
    }
    print(json.dumps(report["equal_to_naive"], indent=1))
    write_results(args.out, report, indent=1)


if __name__ == "__main__":
    main()
