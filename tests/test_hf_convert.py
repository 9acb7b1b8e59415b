"""`jaxdetox convert`: exact re-save, dtype cast, transformers verification."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import torch
from safetensors.numpy import load_file
from test_models_helpers import make_hf_model

from jaxdetox.cli import main


def test_convert_resaves_exactly_and_casts(tmp_path, capsys):
    model = make_hf_model("llama_gqa", seed=8)
    model.save_pretrained(str(tmp_path / "src"))
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--verify"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ok"] and report["max_abs_logit_diff"] <= 1e-4 and report["logit_scale"] >= 1
    # The gate is the relative bound: --tol 0 fails unless the logits are bit-equal.
    status = main(
        ["convert", str(tmp_path / "src"), str(tmp_path / "o2"), "--verify", "--tol", "0"]
    )
    strict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (status == 1) == (strict["max_abs_logit_diff"] > 0) == (not strict["ok"])
    src = load_file(str(tmp_path / "src" / "model.safetensors"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(np.array_equal(src[k], out[k]) for k in src) and set(src) == set(out)

    assert (
        main(["convert", str(tmp_path / "src"), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    )
    cast = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert cast[name].dtype == ml_dtypes.bfloat16
    expected = torch.from_numpy(src[name]).to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(cast[name].view(np.int16), expected)  # same rounding as torch
