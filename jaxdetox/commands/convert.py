"""`jaxdetox convert`: re-save a checkpoint as an HF directory (config.json + safetensors).

    jaxdetox convert path/to/hf_dir out_dir                      # exact re-save
    jaxdetox convert path/to/hf_dir out_dir --dtype bfloat16     # cast parameters
    jaxdetox convert path/to/hf_dir out_dir --verify             # compare logits with transformers
    jaxdetox convert model.gguf out_dir                          # llama.cpp GGUF (Llama) -> HF dir
    jaxdetox convert default out_dir                             # the built-in SmolLM2-135M-Instruct

The output loads with `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` and with
`jaxdetox.models.load_pretrained(out_dir)`. New input formats plug into `load_source`.

OUT must be new or empty; `--overwrite` replaces an existing OUT. The checkpoint is written
into a temporary folder beside OUT and renamed into place when complete, so a failed or
interrupted conversion leaves OUT as it was, and no stale file of an earlier checkpoint
(say a `model.safetensors.index.json` beside a new single `model.safetensors`) survives.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `convert` subcommand."""
    p = subparsers.add_parser(
        "convert",
        help="re-save a checkpoint as an HF dir (optionally cast dtype, verify logits)",
        description=__doc__,
    )
    p.add_argument(
        "source", help="HF checkpoint dir, hub id, Llama .gguf file, or 'default' (built-in GGUF)"
    )
    p.add_argument("out", type=Path, help="output directory (new or empty; see --overwrite)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="parameter dtype of the written tensors (default: %(default)s)",
    )
    p.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="split the weights into files of this size"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists and is not empty"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="reload OUT with transformers (PyTorch) and compare logits on random tokens",
    )
    p.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="--verify bound on max |our logit - transformers' logit| / max(1, max |logit|); "
        "relative, since fp32 rounding grows with depth and logit scale (default: %(default)s)",
    )
    p.set_defaults(func=run)


def load_source(source: str, *, param_dtype: str) -> Any:
    """Load any supported input as a `LanguageModel` (extend here for new formats)."""
    from jaxdetox.models import load_pretrained

    return load_pretrained(source, param_dtype=param_dtype)


def verify(lm: Any, out: Path) -> tuple[float, float]:
    """`(max abs logit difference, max(1, max |logit|))`, ours vs transformers' on the
    written checkpoint."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    tokens = np.random.default_rng(0).integers(0, lm.config.vocab_size, (2, 16)).astype(np.int32)
    ours = np.asarray(lm.logits(tokens))
    ref_model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    return float(np.abs(ours - ref).max()), max(1.0, float(np.abs(ref).max()))


def check_target(out: Path, *, overwrite: bool) -> None:
    """Refuse an OUT that is a file, or a non-empty folder unless `overwrite`."""
    from jaxdetox.pipeline.rundir import RunDirError

    if out.exists() and not out.is_dir():
        raise RunDirError(f"OUT {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        names = sorted(p.name for p in out.iterdir())
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise RunDirError(
            f"OUT {out}: exists and is not empty ({shown}); choose a new folder, or pass "
            "--overwrite to replace it"
        )


def save_into_place(lm: Any, out: Path, *, max_shard_bytes: int) -> None:
    """`lm.save_pretrained` into a temporary sibling of `out`, then rename it to `out` (an
    existing `out` is replaced only once the new checkpoint is complete)."""
    import os
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        lm.save_pretrained(tmp, max_shard_bytes=max_shard_bytes)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a checkpoint is for others to read
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def run(args: argparse.Namespace) -> int:
    """Load `source`, write it to `out`, optionally verify against transformers."""
    from jaxdetox.planning.preflight import check_model

    check_target(args.out, overwrite=args.overwrite)
    check_model(args.source, "SOURCE", tokenizer=False)
    lm = load_source(args.source, param_dtype=args.dtype)
    save_into_place(lm, args.out, max_shard_bytes=int(args.max_shard_gb * 2**30))
    report: dict[str, Any] = {"source": str(args.source), "out": str(args.out)}
    report.update(model_type=lm.config.model_type, dtype=args.dtype)
    status = 0
    if args.verify:
        diff, scale = verify(lm, args.out)
        ok = diff <= args.tol * scale
        report.update(max_abs_logit_diff=diff, logit_scale=scale, ok=ok)
        status = 0 if ok else 1
    print(json.dumps(report))
    return status
