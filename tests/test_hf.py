"""HF interop: exact round trips, transformers loads our output, sharded files, clear errors."""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from test_models_helpers import hf_logits, make_hf_model

from jaxdetox.models import (
    CheckpointError,
    ModelConfig,
    UnsupportedConfigError,
    load_pretrained,
)
from jaxdetox.models.hf import SafetensorsCheckpoint


def _tensors(directory) -> dict[str, np.ndarray]:
    ckpt = SafetensorsCheckpoint(directory)
    return {name: ckpt.get(name) for name in ckpt.names()}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> dir of a saved random HF model (and the torch model)."""
    out = {}
    for name in ("llama_bias_headdim", "gpt2", "llama_tied"):
        model = make_hf_model(name, seed=4)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(str(d))
        out[name] = (d, model)
    return out


@pytest.mark.parametrize("name", ["llama_bias_headdim", "gpt2", "llama_tied"])
def test_hf_ours_hf_round_trip_is_exact_and_loadable(hf_dirs, tmp_path, name):
    from transformers import AutoModelForCausalLM

    src, hf_model = hf_dirs[name]
    lm = load_pretrained(src)
    lm.save_pretrained(tmp_path)
    before, after = _tensors(src), _tensors(tmp_path)
    # HF may or may not store a tied lm_head; everything it stores otherwise must match.
    before.pop("lm_head.weight", None) if lm.config.tie_word_embeddings else None
    assert set(after) == set(before)
    for key in before:
        assert after[key].dtype == before[key].dtype and np.array_equal(after[key], before[key]), (
            key
        )

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens = np.random.default_rng(0).integers(0, 96, (2, 7)).astype(np.int32)
    ours = np.asarray(lm.logits(tokens))
    np.testing.assert_allclose(hf_logits(reloaded, tokens), ours, atol=1e-5)
    np.testing.assert_allclose(hf_logits(hf_model, tokens), ours, atol=1e-4)


def test_bf16_checkpoint_round_trip(tmp_path):
    model = make_hf_model("llama_gqa", seed=5).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "src"))
    lm = load_pretrained(tmp_path / "src", param_dtype="bfloat16", dtype="bfloat16")
    lm.save_pretrained(tmp_path / "out")
    before, after = _tensors(tmp_path / "src"), _tensors(tmp_path / "out")
    assert set(before) == set(after)
    for key in before:
        assert after[key].dtype == ml_dtypes.bfloat16
        assert np.array_equal(after[key].view(np.uint16), before[key].view(np.uint16)), key
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_checkpoints_in_and_out(hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    _, hf_model = hf_dirs["llama_bias_headdim"]
    hf_model.save_pretrained(str(tmp_path / "src"), max_shard_size="20KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    lm = load_pretrained(tmp_path / "src")
    tokens = np.arange(10, dtype=np.int32).reshape(2, 5)
    np.testing.assert_allclose(
        np.asarray(lm.logits(tokens)), hf_logits(hf_model, tokens), atol=1e-4
    )

    lm.save_pretrained(tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    np.testing.assert_allclose(
        hf_logits(reloaded, tokens), np.asarray(lm.logits(tokens)), atol=1e-5
    )


def test_tokenizer_is_loaded_and_saved(hf_dirs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src = tmp_path / "src"
    shutil.copytree(hf_dirs["gpt2"][0], src)
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "hello", "world", "toxic"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>"
    ).save_pretrained(str(src))
    lm = load_pretrained(src)
    assert lm.tokenizer is not None and lm.tokenizer("hello world")["input_ids"] == [2, 3]
    lm.save_pretrained(tmp_path / "out")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out"))("toxic")["input_ids"] == [4]
    assert load_pretrained(hf_dirs["gpt2"][0]).tokenizer is None


def test_config_round_trip_and_v4_layout():
    v4 = {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "rope_theta": 5e5,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "eos_token_id": [1, 2],
    }
    cfg = ModelConfig.from_hf(v4)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta, cfg.num_kv_heads) == (
        "linear",
        2.0,
        5e5,
        4,
    )
    assert cfg.eos_token_id == (1, 2) and hash(cfg)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def _write_llama(tmp_path, **config_changes):
    model = make_hf_model("llama_gqa", seed=6)
    model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(config_changes)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"model_type": "falcon"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
        ({"sliding_window": 128}, "sliding_window"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ],
)
def test_unsupported_config_is_rejected_naming_the_field(tmp_path, changes, field):
    _write_llama(tmp_path, **changes)
    with pytest.raises(UnsupportedConfigError, match=field):
        load_pretrained(tmp_path)


def test_gpt2_unsupported_fields():
    with pytest.raises(UnsupportedConfigError, match="activation_function"):
        ModelConfig.from_hf({"model_type": "gpt2", "vocab_size": 10, "activation_function": "relu"})
    with pytest.raises(UnsupportedConfigError, match="scale_attn_by_inverse_layer_idx"):
        ModelConfig.from_hf(
            {"model_type": "gpt2", "vocab_size": 10, "scale_attn_by_inverse_layer_idx": True}
        )


def test_missing_and_corrupt_files(tmp_path):
    d = _write_llama(tmp_path)
    weights = d / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(d)
    weights.write_bytes(good[: len(good) // 2])  # truncated payload
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(d)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(d)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_pretrained(tmp_path / "nope" / "deeper" / "x")


def test_missing_tensor_and_shape_mismatch(tmp_path):
    d = _write_llama(tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight"
    wrong = dict(tensors, **{name: tensors[name][:-1]})
    save_file(wrong, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"k_proj.weight.*\(15, 32\).*expected \(16, 32\)"):
        load_pretrained(d)
    del wrong[name]
    save_file(wrong, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        load_pretrained(d)


def test_index_naming_a_missing_shard(tmp_path):
    _write_llama(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_pretrained(tmp_path)


def test_hub_id_resolves_through_snapshot_download(hf_dirs, monkeypatch):
    # No network here: stand in for the Hub download and check what we ask it for.
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(hf_dirs["llama_tied"][0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    lm = load_pretrained("someone/tiny-llama", revision="v1")
    assert calls[0][:2] == ("someone/tiny-llama", "v1")
    assert {"*.safetensors", "*.json"} <= set(calls[0][2])
    tokens = np.arange(6, dtype=np.int32).reshape(1, 6)
    np.testing.assert_allclose(
        np.asarray(lm.logits(tokens)), hf_logits(hf_dirs["llama_tied"][1], tokens), atol=1e-4
    )
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="someone/not-cached.*HF Hub"):
        load_pretrained("someone/not-cached")  # HF_HUB_OFFLINE=1 in tests
