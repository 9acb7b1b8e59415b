"""Sampler throughput vs transformers `generate` (PyTorch), same machine, same run.

    python -m benchmarks.sampling_bench [--reps 3] [--only decode,rtp,nado] [--out FILE]

GPT-2-small-shaped random model (12 layers, d=768, 12 heads, vocab 50257, fp32), built in
transformers and loaded into jaxdetox (same weights). Three figures:

1. `decode`: per-step decode ratio by mode at batch 32, prompt 30, 20 new tokens, no early
   stop. Decode-only cost per step is (t(20 new) − t(1 new)) / 19 on both sides. Ours is
   `Sampler.sample` with decode-form weights made once (`Sampler.prepare`, timed apart).
2. `rtp`: the evaluation protocol (RealToxicityPrompts-style): prompts of ≤ 30 tokens, 25
   samples each, top-k 50, 20 new tokens; end-to-end new tokens/s of `sample_prompts`
   (8 prompts per sampler call, as `eval.batch_size`; the decode-form weights are made in
   every call, as in a run) vs one `generate(num_return_sequences=25)` per prompt.
3. `nado`: NADO-guided decoding (a separate 2-layer NADO, q ∝ p · σ(h)^α) vs plain decoding,
   same batch and mode (top-k 50): the guidance overhead.

Runs alternate the sides so machine load hits both alike; the JSON keeps every repetition
with the 1-minute load average. Compile time (the first call of each configuration) is
reported apart from the steady state. On a GPU machine both sides run on the GPU.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch
import transformers

from benchmarks._batches import GPT2_SMALL, NADO_LAYERS
from benchmarks._results import alternate, load_avg, machine_info, write_results
from jaxdetox.lm import lm_sampler
from jaxdetox.models import NadoConfig, init_nado, load_pretrained
from jaxdetox.sampling import SamplingConfig, sample_prompts

# Ours and transformers' `generate` kwargs per mode. `top_k50` is transformers' default
# `do_sample=True` setting, which the paper's sampling used (docs/method.md).
MODES = {
    "greedy": (dict(temperature=0.0), dict(do_sample=False)),
    "top_k50": (dict(temperature=1.0, top_k=50), dict(do_sample=True, top_k=50)),
    "pure": (dict(temperature=1.0), dict(do_sample=True, top_k=0)),
    "top_p": (dict(temperature=1.0, top_p=0.9), dict(do_sample=True, top_p=0.9, top_k=0)),
}
PARTS = ("decode", "rtp", "nado")
_SEEDS = itertools.count(1)  # a fresh seed per call: no two timed calls draw the same


def build_models() -> tuple[Any, Any]:
    """(transformers GPT-2 small in eval mode on the accelerator if any, our LM, same weights)."""
    config = transformers.GPT2Config(**{k: v for k, v in GPT2_SMALL.items() if k != "model_type"})
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        lm = load_pretrained(tmp)
    return hf.to("cuda" if torch.cuda.is_available() else "cpu"), lm


def hf_generate(hf: Any, prompts_bt: np.ndarray, new: int, mode: str, copies: int = 1) -> None:
    """transformers `generate` of exactly `new` tokens for each prompt row (× `copies`)."""
    ids = torch.tensor(prompts_bt, dtype=torch.long, device=hf.device)
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
            num_return_sequences=copies,
            **MODES[mode][1],
        )
    if hf.device.type == "cuda":
        torch.cuda.synchronize()
    assert out.shape == (len(prompts_bt) * copies, prompts_bt.shape[1] + new)


def ours_sample(
    sampler: Any, params: Any, prompts: list, new: int, mode: str, *, nado: Any = None
) -> None:
    """`Sampler.sample` of exactly `new` tokens per prompt (seeded afresh each call)."""
    config = SamplingConfig(max_new_tokens=new, seed=next(_SEEDS), **MODES[mode][0])
    out = sampler.sample(params, prompts, config, nado_params=nado)
    jax.block_until_ready(out.tokens)
    assert int(np.asarray(out.lengths).min()) == new


def decode_modes(
    hf: Any,
    lm: Any,
    *,
    batch: int = 32,
    prompt: int = 30,
    new: int = 20,
    reps: int = 3,
    modes: tuple[str, ...] = tuple(MODES),
) -> dict:
    """Per-mode decode-step time and end-to-end time, ours vs transformers."""
    sampler, params, _ = lm_sampler(lm)
    start = time.perf_counter()
    params, _ = sampler.prepare(params)
    jax.block_until_ready(params)
    out: dict[str, Any] = {
        "prepare_s (decode-form weights once, incl. compile)": time.perf_counter() - start
    }
    prompts_bt = np.random.default_rng(0).integers(0, 50257, (batch, prompt)).astype(np.int64)
    prompts = prompts_bt.tolist()
    for mode in modes:
        before = sampler.compile_seconds
        for n in (new, 1):
            ours_sample(sampler, params, prompts, n, mode)
        compile_s = sampler.compile_seconds - before
        timing = alternate(
            {
                "hf": lambda m=mode: hf_generate(hf, prompts_bt, new, m),
                "ours": lambda m=mode: ours_sample(sampler, params, prompts, new, m),
                "hf_prefill": lambda m=mode: hf_generate(hf, prompts_bt, 1, m),
                "ours_prefill": lambda m=mode: ours_sample(sampler, params, prompts, 1, m),
            },
            reps,
        )
        med = timing["median_s"]
        step = {s: (med[s] - med[f"{s}_prefill"]) / (new - 1) for s in ("hf", "ours")}
        out[mode] = {
            "compile_s_ours": round(compile_s, 2),
            **timing,
            "decode_step_ms": {s: round(1e3 * v, 2) for s, v in step.items()},
            "decode_speedup": round(step["hf"] / step["ours"], 3),
            "end_to_end_speedup": round(med["hf"] / med["ours"], 3),
        }
        print(mode, out[mode]["decode_step_ms"], out[mode]["decode_speedup"], flush=True)
    out["setup"] = {"batch": batch, "prompt_len": prompt, "new_tokens": new, "reps": reps}
    return out


def rtp(
    hf: Any,
    lm: Any,
    *,
    prompts: int = 8,
    samples: int = 25,
    new: int = 20,
    max_prompt: int = 30,
    batch_size: int = 8,
    reps: int = 3,
    vocab: int = 50257,
) -> dict:
    """RTP-style sampling: end-to-end new tokens/s, `sample_prompts` vs per-prompt `generate`."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(min(5, max_prompt), max_prompt + 1, prompts)
    prompt_list = [rng.integers(0, vocab, n).tolist() for n in lengths]
    sampler, params, _ = lm_sampler(lm)
    batch_size = min(batch_size, prompts)  # no filler prompts in a short run
    config = SamplingConfig(
        max_new_tokens=new, top_k=50, num_samples=samples, prompt_bucket=max_prompt + 2
    )

    def ours() -> None:
        out = sample_prompts(
            sampler, params, prompt_list, config, batch_size=batch_size, progress=False
        )
        assert out.tokens.shape[0] == prompts * samples and int(out.lengths.min()) == new

    def theirs() -> None:
        for p in prompt_list:
            hf_generate(hf, np.asarray([p]), new, "top_k50", copies=samples)

    before = sampler.compile_seconds
    start = time.perf_counter()
    ours()
    first_s = time.perf_counter() - start
    timing = alternate({"hf": theirs, "ours": ours}, reps)
    tokens = prompts * samples * new
    tps = {s: tokens / t for s, t in timing["median_s"].items()}
    return {
        "prompts": prompts,
        "prompt_lengths": lengths.tolist(),
        "samples_per_prompt": samples,
        "new_tokens": new,
        "prompts_per_sampler_call": batch_size,
        "compile_s_ours": round(sampler.compile_seconds - before, 2),
        "first_call_s_ours_incl_compile": round(first_s, 2),
        **timing,
        "tokens_per_s": {s: round(v, 1) for s, v in tps.items()},
        "speedup": round(tps["ours"] / tps["hf"], 3),
    }


def nado_overhead(
    lm: Any, *, batch: int = 32, prompt: int = 30, new: int = 20, reps: int = 3, vocab: int = 50257
) -> dict:
    """NADO-guided vs plain decoding (top-k 50), same batch: time ratio guided / plain."""
    nado_config = NadoConfig.for_lm(
        lm.config, "separate", num_layers=NADO_LAYERS, head_init="normal"
    )
    nado = init_nado(nado_config, 0, lm_model=lm.model, mesh=lm.mesh)
    plain, params, _ = lm_sampler(lm)
    guided, g_params, nado_params = lm_sampler(lm, nado)
    params, _ = plain.prepare(params)
    g_params, nado_params = guided.prepare(g_params, nado_params)
    prompts = np.random.default_rng(2).integers(0, vocab, (batch, prompt)).tolist()
    before = plain.compile_seconds + guided.compile_seconds
    ours_sample(plain, params, prompts, new, "top_k50")
    ours_sample(guided, g_params, prompts, new, "top_k50", nado=nado_params)
    compile_s = plain.compile_seconds + guided.compile_seconds - before
    timing = alternate(
        {
            "plain": lambda: ours_sample(plain, params, prompts, new, "top_k50"),
            "guided": lambda: ours_sample(
                guided, g_params, prompts, new, "top_k50", nado=nado_params
            ),
        },
        reps,
    )
    med = timing["median_s"]
    return {
        "batch": batch,
        "prompt_len": prompt,
        "new_tokens": new,
        "nado_layers": NADO_LAYERS,
        "compile_s": round(compile_s, 2),
        **timing,
        "guided_over_plain": round(med["guided"] / med["plain"], 3),
    }


def run(
    parts: tuple[str, ...] = PARTS,
    *,
    reps: int = 3,
    rtp_prompts: int = 8,
    modes: tuple[str, ...] = tuple(MODES),
) -> dict:
    """The sampling figures named in `parts` (build the models once)."""
    if not torch.cuda.is_available():
        torch.set_num_threads(2)
    hf, lm = build_models()
    out: dict[str, Any] = {"load_avg_start": load_avg(), "hf_device": str(hf.device)}
    if "decode" in parts:
        out["decode"] = decode_modes(hf, lm, reps=reps, modes=modes)
    if "rtp" in parts:
        out["rtp"] = rtp(hf, lm, prompts=rtp_prompts, reps=reps)
    if "nado" in parts:
        out["nado"] = nado_overhead(lm, reps=reps)
    out["load_avg_end"] = load_avg()
    return out


def main() -> None:
    """CLI: run the chosen parts and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default=",".join(PARTS))
    parser.add_argument("--rtp-prompts", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/sampling.json")
    args = parser.parse_args()
    parts = tuple(args.only.split(","))
    result = {"machine": machine_info(), **run(parts, reps=args.reps, rtp_prompts=args.rtp_prompts)}
    write_results(args.out, result)


if __name__ == "__main__":
    main()
