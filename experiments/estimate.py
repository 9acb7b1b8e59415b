"""Estimated wall time of a run config from its FLOPs (no weights loaded, offline).

    python experiments/estimate.py experiments/gpt2/small/pr_sequential.yaml --peak 989 --devices 1

Counts per iteration: sampling (prefill + decode, 2·N FLOPs per token), the NADO and LLM train
steps (`jaxdetox.train.flops`, the counts MFU uses) and the evaluation's sampling; labelling
is left out (the oracle runs beside the LLM and its cost depends on which oracle). Time =
FLOPs / (devices · peak · utilisation), with `--mfu` for train steps and `--decode-util`
for sampling (decoding is memory-bound: a small fraction of peak). These are estimates, not
measurements; the READMEs say which numbers were measured.
"""

from __future__ import annotations

import argparse
import math

from jaxdetox.config import load_config
from jaxdetox.models import NadoConfig
from jaxdetox.planning.plan import model_config_of
from jaxdetox.train import flops as fl


def estimate(path: str, peak_tflops: float, devices: int, mfu: float, decode_util: float) -> dict:
    """Seconds per part of one run of the config at `path`."""
    c = load_config(path)
    lm = model_config_of(c.model.path)
    n_params = fl.layer_weights(lm) * lm.num_layers + lm.hidden_size * lm.vocab_size
    prompt = c.prompts.max_tokens
    seq = prompt + c.sampling.max_new_tokens
    rate = devices * peak_tflops * 1e12
    iters = c.loop.iterations
    runs = len(c.baseline.lambdas) if c.method == "lambda_sweep" else 1
    rows = c.prompts.block_size * c.sampling.num_samples
    gen_tokens = rows * c.sampling.max_new_tokens
    out = {"sample": 0.0, "train_nado": 0.0, "finetune": 0.0}
    if c.method not in ("base", "sft_only"):
        # One prefill per prompt, then every sample's decode.
        flops = 2 * n_params * (c.prompts.block_size * prompt + gen_tokens)
        out["sample"] = iters * flops / (rate * decode_util)
    body = None
    if c.method in ("nado_decoding", "pr_sequential", "pr_parallel", "lambda_sweep"):
        body = NadoConfig.for_lm(lm, c.nado.variant, num_layers=c.nado.num_layers).body
        t = c.train_nado
        steps = t.epochs * math.ceil(rows / t.batch_size)
        step = fl.nado_step_flops(lm, body, tokens=t.batch_size * seq, seq_len=seq,
                                  consistency=t.consistency is not None)  # fmt: skip
        out["train_nado"] = iters * steps * step.total / (rate * mfu)
    f = c.finetune
    corpus = 0 if c.corpus is None else c.corpus.batch_size * c.corpus.seq_len
    sample_tokens = f.batch_size * seq
    steps = f.epochs * math.ceil(rows / f.batch_size)
    steps = min(steps, f.max_steps) if f.max_steps else steps
    if c.method in ("pr_sequential", "pr_parallel", "lambda_sweep"):
        step = fl.lm_step_flops(lm, body, tokens=sample_tokens + corpus, kl_tokens=sample_tokens,
                                seq_len=seq).total  # fmt: skip
    elif c.method in ("filter_sft", "sft_only", "reinforce", "dpo"):
        per_token = fl.body_forward_flops(lm, seq) + fl.head_flops(lm)
        sampled = 0 if c.method == "sft_only" else sample_tokens
        if c.method == "dpo":  # two sequences per pair, each also through the reference
            steps = f.epochs * math.ceil(rows / 2 / f.batch_size)
            step = (3 + 1) * 2 * sampled * per_token + 3 * corpus * per_token
        else:
            ref = sampled if c.method == "reinforce" and c.baseline.kl_coef > 0 else 0
            step = (3 * (sampled + corpus) + ref) * per_token
    else:
        step = 0.0
    if step:
        out["finetune"] = iters * steps * step / (rate * mfu)
    trained = 0 if c.method == "base" else (iters // c.eval.every if c.eval.every else 1)
    n_evals = int(c.eval.base) + trained
    n_eval = c.eval.max_prompts or (c.prompts.eval_size or 88)
    eval_tokens = n_eval * (prompt + c.eval.num_samples * c.eval.max_new_tokens)
    out["eval"] = n_evals * 2 * n_params * eval_tokens / (rate * decode_util)
    return {k: v * runs for k, v in out.items()}


def main() -> None:
    """Print the estimate of each config given."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("configs", nargs="+")
    p.add_argument("--peak", type=float, default=989.0, help="TFLOP/s per device (bf16 dense)")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--mfu", type=float, default=0.35, help="utilisation of train steps")
    p.add_argument("--decode-util", type=float, default=0.05, help="utilisation of sampling")
    args = p.parse_args()
    for path in args.configs:
        parts = estimate(path, args.peak, args.devices, args.mfu, args.decode_util)
        total = sum(parts.values()) / 3600
        detail = ", ".join(f"{k} {v / 3600:.2f} h" for k, v in parts.items() if v)
        print(f"{path}: {total:.1f} h ({detail})")


if __name__ == "__main__":
    main()
