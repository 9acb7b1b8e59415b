"""`hf:<dir>` oracle on a tiny random RoBERTa classifier and tokenizer built locally."""

import numpy as np
import pytest

from jaxdetox import oracles

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = "you are a kind stupid idiot person the cat sat on mat have nice day what".split()
TEXTS = [
    "you are a stupid idiot",
    "have a nice day",
    "the cat sat on the mat",
    "what",
    "you are a kind person the cat sat on the mat have a nice day what a day",
    "unknown words here",
]


def build_classifier(out_dir, seed=0, problem_type=None):
    """Save a random 2-layer RoBERTa classifier + a WordLevel fast tokenizer into `out_dir`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
    )
    fast.save_pretrained(out_dir)
    config = transformers.RobertaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=20,  # 18 usable positions: exercises truncation
        num_labels=2,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        problem_type=problem_type,
        initializer_range=0.5,  # the default 0.02 gives near-constant scores for every text
    )
    torch.manual_seed(seed)
    model = transformers.RobertaForSequenceClassification(config).eval()
    model.save_pretrained(out_dir)
    return model, fast


def reference_logits(model, tokenizer, text, max_length=18):
    """Logits of one unpadded text straight from the torch model."""
    enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
    with torch.no_grad():
        return model(**enc).logits[0]


@pytest.mark.slow  # first import of transformers' torch models takes most of ~8 s
def test_scores_equal_softmax_of_torch_logits(tmp_path):
    model, tokenizer = build_classifier(tmp_path)
    oracle = oracles.load(f"hf:{tmp_path}", batch_size=4)
    tox, ok = oracle.score(TEXTS)
    ref = np.array([torch.softmax(reference_logits(model, tokenizer, t), -1)[1] for t in TEXTS])
    assert ok.all() and tox.dtype == np.float32
    np.testing.assert_allclose(tox, ref, atol=1e-5)
    assert np.ptp(tox) > 0.1  # the reference is not trivially constant
    assert oracle.stats.calls == 2 and oracle.max_length == 18

    # Label chosen by index or by name; index 0 is the complement.
    by_name, _ = oracles.load(f"hf:{tmp_path}", toxic_label="LABEL_1").score(TEXTS)
    np.testing.assert_allclose(by_name, tox, atol=1e-6)
    other, _ = oracles.load(f"hf:{tmp_path}", toxic_label=0).score(TEXTS)
    np.testing.assert_allclose(other, 1 - tox, atol=1e-5)
    with pytest.raises(ValueError, match="label2id"):
        oracles.load(f"hf:{tmp_path}", toxic_label="toxic")


def test_multilabel_head_uses_sigmoid_and_id_tracks_weights(tmp_path):
    model, tokenizer = build_classifier(tmp_path / "a", problem_type="multi_label_classification")
    oracle = oracles.load(f"hf:{tmp_path / 'a'}")
    tox, ok = oracle.score(TEXTS[:3])
    ref = [torch.sigmoid(reference_logits(model, tokenizer, t)[1]) for t in TEXTS[:3]]
    np.testing.assert_allclose(tox, ref, atol=1e-5)
    assert '"act":"sigmoid"' in oracle.oracle_id
    build_classifier(tmp_path / "b", seed=1, problem_type="multi_label_classification")
    other = oracles.load(f"hf:{tmp_path / 'b'}")
    assert other.oracle_id.split("@")[1] != oracle.oracle_id.split("@")[1]  # new weights


def test_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(oracles.OracleUnavailableError, match="no config.json"):
        oracles.load(f"hf:{tmp_path / 'nothing'}")


@pytest.mark.slow
def test_any_label_as_the_violation_or_the_wanted_class(tmp_path):
    build_classifier(tmp_path)
    base, _ = oracles.load(f"hf:{tmp_path}").score(TEXTS)
    by_label, _ = oracles.load(f"hf:{tmp_path}", label="LABEL_0").score(TEXTS)
    np.testing.assert_allclose(by_label, 1 - base, atol=1e-5)
    wanted = oracles.load(f"hf:{tmp_path}", satisfied_label="LABEL_1")
    np.testing.assert_allclose(wanted.score(TEXTS)[0], 1 - base, atol=1e-5)
    assert '"satisfied":true' in wanted.oracle_id
    with pytest.raises(ValueError, match="not both"):
        oracles.load(f"hf:{tmp_path}", label=0, satisfied_label=1)
