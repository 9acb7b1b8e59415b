"""Train-step throughput on CPU: our jitted steps vs HF PyTorch, and `joint_step` vs its parts.

    python -m benchmarks.train_step_bench [--reps 5] [--quick] [--profile] [--out ...]

GPT-2-small shape (12 layers, d=768, 12 heads, vocab 50257), fp32, batch 8 x 128 tokens.
HF builds a random `GPT2LMHeadModel` (dropout off), we load the same checkpoint, so both
sides train the same weights on the same random tokens (the first losses must agree).

1. `sft`: `sft_step` through `StepRunner` (AdamW, global-norm clip 1.0, every parameter
   trains) vs transformers' `model(ids, labels=ids).loss.backward()`, `clip_grad_norm_(1.0)`,
   `torch.optim.AdamW.step()`, `zero_grad()` (torch threads = 2). Model FLOP/s come from
   `jaxdetox.train.flops` and are divided by the measured fp32 matmul peak (best of every
   peak measurement in the run); XLA's `cost_analysis` FLOPs are reported beside them.
2. `joint`: `joint_step` (LLM + NADO-separate-2-layers, samples stream with labels) vs the
   sum of its parts, each jitted alone on the same batch: `sft_step` (student forward +
   backward + NLL + AdamW), the reference forward (body + head logits + log-softmax), the
   teacher's NADO head (logits + log-sigmoid from precomputed NADO hidden states) and
   `nado_step` (NADO body forward + backward, BCE on gathered rows, AdamW).
3. `lm_reg` (skip with --quick): `lm_step` on the samples stream vs a PyTorch step written
   the way the authors' code does it: full `[B, T, V]` logits of student, reference and
   NADO, soft-target CE to softmax(ref + logsigmoid(nado)).

Timed repetitions alternate between the sides so shared-CPU noise hits both alike; compile
time and the first (warm-up) call are reported apart. `--profile` adds per-op times of one
step on each side (jax.profiler / torch.profiler). Writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import collections
import gc
import glob
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks._batches import LR, NADO_LAYERS, make_stream, with_labels
from benchmarks._jax_steps import Ours, block, cost_flops
from benchmarks._results import alternate, load_avg, machine_info, timed, write_results
from benchmarks.torch_baseline import HFStep, TorchRegularizedStep, gpt2_models
from jaxdetox import sharding
from jaxdetox.losses import head_logits
from jaxdetox.models import NadoConfig, init_nado, load_pretrained
from jaxdetox.train import (
    OptimizerConfig,
    joint_step,
    lm_step,
    make_training,
    nado_step,
    sft_step,
)
from jaxdetox.train import flops as train_flops
from jaxdetox.train.state import bind
from jaxdetox.train.steps import lm_hidden

SECTIONS = ("sft", "joint", "lm_reg")


# ----------------------------------------------------------------------------- setup


def build(section: str):
    """HF GPT-2 small (random, dropout off) and our LM (+ a separate NADO) on the same weights.

    Only what `section` needs is kept (the machine is shared: the whole set at once took
    10 GB): `sft` has no NADO, `joint` drops the HF model, `lm_reg` freezes the NADO.
    """
    hf, _, _ = gpt2_models(nado=False)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_pretrained(d, mesh=mesh, tokenizer=False)
    if section == "joint":
        hf = None
    nado = None
    if section != "sft":
        nado = init_nado(
            NadoConfig.for_lm(ours.config, "separate", num_layers=NADO_LAYERS, head_init="normal"),
            0,
            lm_model=ours.model,
            mesh=mesh,
        )
    opt = OptimizerConfig(learning_rate=LR)
    nado_opt = opt if section == "joint" else None
    tr = make_training(ours.model, nado, mesh, lm_optimizer=opt, nado_optimizer=nado_opt)
    return hf, ours.config, None if nado is None else nado.config, mesh, tr


def peak_now() -> float:
    """An uncached fp32 matmul peak measurement (`measured_matmul_peak` is cached)."""
    return train_flops.measured_matmul_peak.__wrapped__(1024, 3)


def _placed(batch, mesh):
    from jaxdetox.train import place_batch

    return place_batch(batch, mesh)


# ----------------------------------------------------------------------------- profiles


def _hlo_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> 'op shape' from optimized HLO text (dots inside fusions marked)."""
    kinds, fusion_has_dot, comp = {}, {}, None
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?.*\{\s*$", line)
        if m and "=" not in line.split("{")[0]:
            comp = m.group(1)
            continue
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(", line)
        if not m:
            continue
        name, shape, op = m.groups()
        if op in ("dot", "convolution") and comp:
            fusion_has_dot[comp] = True
        call = re.search(r"calls=%?([\w.\-]+)", line)
        kind = op
        if op == "fusion" and call:
            kind = f"fusion[{call.group(1)}]"
        kinds[name] = f"{kind} {shape}"
    for name, kind in kinds.items():
        call = re.match(r"fusion\[([\w.\-]+)\]", kind)
        if call:
            tag = "dot-fusion" if fusion_has_dot.get(call.group(1)) else "fusion"
            kinds[name] = kind.replace(f"fusion[{call.group(1)}]", tag)
    return kinds


def _category(name: str, kind: str) -> str:
    if kind in ("dot", "dot-fusion", "convolution"):
        return "matmul"
    if "dynamic-update-slice" in name:
        return "layer-stack writes (dynamic-update-slice)"
    if "dynamic-slice" in name:
        return "layer-stack reads (dynamic-slice)"
    if "broadcast" in name and kind != "dot-fusion" and name.startswith("wrapped_broadcast"):
        return "zero fills (broadcast)"
    if kind in ("copy", "transpose") or name.startswith(("copy", "transpose")):
        return "copies / transposes"
    if kind.startswith("while") or kind in ("call", "conditional"):
        return "control"
    return "elementwise / reduce fusions"


def profile_ours(run, compiled, steps: int = 2, top: int = 20) -> dict:
    """Per-op time (thread-ms per step, summed over XLA's worker threads, which run independent
    thunks concurrently) of a jitted step on XLA:CPU, from a jax.profiler trace."""
    kinds = _hlo_kinds(compiled.as_text())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                run()
        path = glob.glob(d + "/**/*.xplane.pb", recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(path)
    per_op: dict[str, float] = collections.defaultdict(float)
    skip = ("ThreadpoolListener", "SlinkyThreadPool", "ThunkExecutor", "end: ")
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if "XLAEigen" not in line.name and "PjRtCpuClient" not in line.name:
                continue
            for ev in line.events:
                if not ev.name.startswith(skip):
                    per_op[ev.name] += ev.duration_ns / 1e6 / steps
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, ms in per_op.items():
        by_kind[_category(name, kinds.get(name, name).split(" ")[0])] += ms
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return {
        "total_ms": round(sum(per_op.values()), 1),
        "by_kind_ms": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_ops_ms": [[n, kinds.get(n, "?"), round(ms, 1)] for n, ms in ranked],
    }


def profile_torch(fn, top: int = 20) -> dict:
    """Self CPU time per aten op (ms per step) of one step, from torch.profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return {
        "total_self_ms": round(sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3, 1),
        "top_ops_ms": [[e.key, e.count, round(e.self_cpu_time_total / 1e3, 1)] for e in rows],
    }


# ----------------------------------------------------------------------------- benches


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_sft(hf, cfg, mesh, ours: Ours, stream: dict, reps: int, profile: bool) -> dict:
    b, t = stream["tokens_bt"].shape
    batch = {"corpus": stream}
    ours.runner("sft", sft_step)
    compile_s, xla_flops = ours.compile("sft", batch)
    hf_step = HFStep(hf, stream)
    loss_hf = hf_step()  # warm-up (and the first losses must agree: same weights)
    loss_ours = float(ours.step("sft", batch)["lm/corpus/nll"])
    times = {"hf": [], "ours": []}
    peaks, loads = [train_flops.measured_matmul_peak()], []
    for _ in range(reps):
        loads.append(load_avg())
        times["hf"].append(timed(hf_step))
        times["ours"].append(timed(lambda: ours.step("sft", batch)))
        peaks.append(peak_now())
    model_flops = train_flops.lm_step_flops(cfg, None, tokens=b * t, kl_tokens=0, seq_len=t).lm
    peak = max(peaks)
    m = {k: med(v) for k, v in times.items()}
    out = {
        "batch": b,
        "length": t,
        "compile_s": round(compile_s, 2),
        "first_loss_hf": round(loss_hf, 5),
        "first_loss_ours": round(loss_ours, 5),
        "hf_s": [round(x, 3) for x in times["hf"]],
        "ours_s": [round(x, 3) for x in times["ours"]],
        "hf_median_s": round(m["hf"], 3),
        "ours_median_s": round(m["ours"], 3),
        "time_ratio_ours_over_hf": round(m["ours"] / m["hf"], 3),
        "model_flops": model_flops,
        "xla_cost_analysis_flops": xla_flops,
        "matmul_peak_flops": round(peak),
        "matmul_peaks_measured": [round(p / 1e9, 1) for p in peaks],
        "ours_mfu": round(model_flops / m["ours"] / peak, 3),
        "hf_mfu": round(model_flops / m["hf"] / peak, 3),
        "load_avg": loads,
    }
    if profile:
        placed = _placed(batch, mesh)
        compiled = ours.runners["sft"].compile(ours.state, placed)
        out["profile_ours"] = profile_ours(lambda: ours.step("sft", batch), compiled)
        out["profile_hf"] = profile_torch(hf_step)
    return out


def part_functions(models, mesh):
    """Jitted forward-only parts of the joint step (pure functions of params and a stream)."""

    @jax.jit
    def ref_forward(ref_params, stream):
        h, head = lm_hidden(models.lm, ref_params, stream)
        return jnp.sum(jax.nn.log_softmax(head_logits(h, head), axis=-1)[..., 0])

    @jax.jit
    def nado_hidden(nado_params, stream):
        h, _ = bind(models.nado, nado_params).hidden_states(
            stream["tokens_bt"],
            positions_bt=stream["positions_bt"],
            segment_ids_bt=stream["segment_ids_bt"],
        )
        return h

    @jax.jit
    def nado_head(nado_params, h_nado):
        head = bind(models.nado, nado_params).unembed_weights()
        return jnp.sum(jax.nn.log_sigmoid(head_logits(h_nado, head))[..., 0])

    return ref_forward, nado_hidden, nado_head


def bench_joint(cfg, nado_cfg, mesh, ours: Ours, stream: dict, reps: int, profile: bool) -> dict:
    b, t = stream["tokens_bt"].shape
    samples = {"samples": stream}
    corpus = {"corpus": {k: v for k, v in stream.items() if k.endswith("_bt")}}
    ours.runner("joint", joint_step)
    ours.runner("sft", sft_step)
    ours.runner("nado", nado_step)
    compile_s = {}
    xla = {}
    for name, batch in (("joint", samples), ("sft", corpus), ("nado", samples)):
        compile_s[name], xla[name] = ours.compile(name, batch)
    ref_forward, nado_hidden, nado_head = part_functions(ours.tr.models, mesh)
    placed = _placed(samples, mesh)["samples"]
    with jax.set_mesh(mesh):
        h_nado = block(nado_hidden(ours.state.nado.params, placed))
        start = time.perf_counter()
        rf = ref_forward.lower(ours.state.ref_params, placed).compile()
        nh = nado_head.lower(ours.state.nado.params, h_nado).compile()
        compile_s["parts"] = time.perf_counter() - start
    xla["ref_forward"], xla["nado_head"] = cost_flops(rf), cost_flops(nh)

    def run_ref():
        return block(rf(ours.state.ref_params, _placed(samples, mesh)["samples"]))

    def run_nado_head():
        return block(nh(ours.state.nado.params, h_nado))

    runs = {
        "joint": lambda: ours.step("joint", samples),
        "sft": lambda: ours.step("sft", corpus),
        "ref_forward": run_ref,
        "nado_head": run_nado_head,
        "nado_step": lambda: ours.step("nado", samples),
    }
    timing = alternate(runs, reps)
    times = timing["s"]
    m = {k: med(v) for k, v in times.items()}
    parts = m["sft"] + m["ref_forward"] + m["nado_head"] + m["nado_step"]
    # Per-rep sums too: the ratio of medians and the median of per-rep ratios.
    per_rep = [
        times["joint"][i]
        / (
            times["sft"][i]
            + times["ref_forward"][i]
            + times["nado_head"][i]
            + times["nado_step"][i]
        )
        for i in range(reps)
    ]
    f = train_flops.lm_step_flops(
        cfg, nado_cfg.body, tokens=b * t, kl_tokens=b * t, seq_len=t, nado_trained=True
    )
    out = {
        "batch": b,
        "length": t,
        "nado_layers": NADO_LAYERS,
        "compile_s": {k: round(v, 2) for k, v in compile_s.items()},
        "times_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median_s": {k: round(v, 3) for k, v in m.items()},
        "load_avg": timing["load_avg"],
        "sum_of_parts_s": round(parts, 3),
        "joint_over_parts": round(m["joint"] / parts, 3),
        "joint_over_parts_per_rep_median": round(med(per_rep), 3),
        "model_flops_joint": f.total,
        "model_flops_parts": {"lm": f.lm, "reference": f.reference, "nado": f.nado},
        "xla_cost_analysis_flops": xla,
    }
    if profile:
        compiled = ours.runners["joint"].compile(ours.state, _placed(samples, mesh))
        out["profile_joint"] = profile_ours(runs["joint"], compiled)
    return out


def bench_lm_reg(hf, mesh, ours: Ours, stream: dict, reps: int, profile: bool) -> dict:
    """`lm_step` (KL to the guided teacher on the samples stream) vs the authors' PyTorch form."""
    samples = {"samples": stream}
    ours.runner("lm", lm_step)
    compile_s, xla_flops = ours.compile("lm", samples)
    # A PyTorch NADO of the same shape (2 GPT-2 layers + a [V, D] head with bias), frozen.
    _, nado_body, nado_head = gpt2_models(nado=True, seed=1)
    torch_step = TorchRegularizedStep(hf, nado_body, nado_head, stream, train_nado=False)
    torch_step()
    ours.step("lm", samples)
    times = {"torch": [], "ours": []}
    for _ in range(reps):
        times["torch"].append(timed(torch_step))
        times["ours"].append(timed(lambda: ours.step("lm", samples)))
    m = {k: med(v) for k, v in times.items()}
    out = {
        "compile_s": round(compile_s, 2),
        "xla_cost_analysis_flops": xla_flops,
        "torch_s": [round(x, 3) for x in times["torch"]],
        "ours_s": [round(x, 3) for x in times["ours"]],
        "torch_median_s": round(m["torch"], 3),
        "ours_median_s": round(m["ours"], 3),
        "time_ratio_ours_over_torch": round(m["ours"] / m["torch"], 3),
    }
    if profile:
        compiled = ours.runners["lm"].compile(ours.state, _placed(samples, mesh))
        out["profile_ours"] = profile_ours(lambda: ours.step("lm", samples), compiled)
        out["profile_torch"] = profile_torch(torch_step)
    return out


# ----------------------------------------------------------------------------- report


def table(report: dict) -> str:
    rows = [
        "| comparison | ours (median) | other side (median) | ratio | goal |",
        "|---|---|---|---|---|",
    ]
    s = report.get("sft")
    if s:
        rows.append(
            f"| SFT step vs HF | {s['ours_median_s']:.2f} s | {s['hf_median_s']:.2f} s | "
            f"{s['time_ratio_ours_over_hf']:.2f}× | ≤ 0.9× |"
        )
        rows.append(
            f"| SFT MFU (peak {s['matmul_peak_flops'] / 1e9:.0f} GFLOP/s) | {s['ours_mfu']:.2f} | "
            f"{s['hf_mfu']:.2f} (HF) | | ≥ 0.7 |"
        )
    j = report.get("joint")
    if j:
        rows.append(
            f"| joint_step vs sum of parts | {j['median_s']['joint']:.2f} s | "
            f"{j['sum_of_parts_s']:.2f} s | {j['joint_over_parts']:.2f}× | ≤ 1.1× |"
        )
    r = report.get("lm_reg")
    if r:
        rows.append(
            f"| lm_step vs PyTorch (authors' form) | {r['ours_median_s']:.2f} s | "
            f"{r['torch_median_s']:.2f} s | {r['time_ratio_ours_over_torch']:.2f}× | — |"
        )
    return "\n".join(rows)


def run_section(
    section: str, *, batch: int = 8, length: int = 128, reps: int = 3, profile: bool = False
) -> dict:
    """Build what `section` ("sft" | "joint" | "lm_reg") needs, time it, free it; its figures."""
    if section not in SECTIONS:
        raise ValueError(f"train-step section {section!r}; expected one of {SECTIONS}")
    jax.config.update("jax_default_matmul_precision", "highest")  # fp32 on both sides
    torch.set_num_threads(2)
    load_start = os.getloadavg()[0]
    hf, cfg, nado_cfg, mesh, tr = build(section)
    ours = Ours(tr, mesh)
    rng = np.random.default_rng(0)
    stream = make_stream(rng, batch, length, cfg.vocab_size)
    labelled = with_labels(stream, rng)
    if section == "sft":
        out = bench_sft(hf, cfg, mesh, ours, stream, reps, profile)
    elif section == "joint":
        out = bench_joint(cfg, nado_cfg, mesh, ours, labelled, reps, profile)
    else:
        out = bench_lm_reg(hf, mesh, ours, labelled, reps, profile)
    out["reps"] = reps
    out["load_avg_1m"] = [load_start, os.getloadavg()[0]]
    del hf, ours, tr
    gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--lm-reg-reps", type=int, default=3, help="reps of the lm_reg bench")
    parser.add_argument("--quick", action="store_true", help="2 reps, no lm_reg comparison")
    parser.add_argument("--only", default="sft,joint,lm_reg", help="comma-separated benches")
    parser.add_argument("--profile", action="store_true", help="per-op profiles of one step")
    parser.add_argument(
        "--merge", action="store_true", help="update the sections run in an existing --out"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results/train_step.json"
    )
    args = parser.parse_args()
    reps = 2 if args.quick else args.reps
    only = set(args.only.split(","))
    if args.quick:
        only.discard("lm_reg")

    report = json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
    report.update(benchmark="train_step", machine=machine_info())
    for section in SECTIONS:
        if section not in only:
            continue
        n = min(reps, args.lm_reg_reps) if section == "lm_reg" else reps
        report[section] = run_section(
            section, batch=args.batch, length=args.length, reps=n, profile=args.profile
        )
        report["table"] = table(report)
        write_results(args.out, report)  # after every section: a killed run keeps the rest
    print(report["table"])


if __name__ == "__main__":
    main()
