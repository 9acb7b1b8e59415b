"""Constraint oracles without code: the word-list (`lexicon`) and `py:module:function` ones."""

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from jaxdetox import oracles
from jaxdetox.oracles.base import OracleError

LEXICON = Path(__file__).parent / "fixtures" / "lexicon.txt"


def violations(oracle, texts):
    score, ok = oracle.score(texts)
    assert ok.all()
    return score.tolist()


def test_lexicon_case_insensitive_and_word_boundaries():
    o = oracles.load("lexicon", path=str(LEXICON))
    assert o.entries == ["darn", "Straße", "naïve idea", "c++", "日本"]
    texts = [
        "Darn it",  # case
        "DARN!",  # punctuation is a boundary
        "darned",  # inside a longer word: no
        "undarn",  # no
        "darn_it",  # '_' is a word character: no
        "a nice day",  # no entry
        "",  # empty text satisfies
    ]
    assert violations(o, texts) == [1, 1, 0, 0, 0, 0, 0]


def test_lexicon_unicode_folding_phrases_and_symbols():
    o = oracles.load("lexicon", path=str(LEXICON))
    texts = [
        "die STRASSE ist lang",  # ß case-folds to ss
        "Straßenbahn",  # inside a longer word (any script): no
        "a NAÏVE\n  idea indeed",  # phrase across any whitespace, accented capital
        "naïveidea",  # no
        "I code in C++ daily",  # entry ending in punctuation still needs a boundary after
        "c+++",  # no: only 'c++' followed by '+'... which is not a word char -> match
        "日本 is a country",
        "日本語",  # CJK letters are word characters: inside a word, no
        "ｄａｒｎ",  # full-width letters fold (NFKC) to ASCII
    ]
    assert violations(o, texts) == [1, 0, 1, 0, 1, 1, 1, 0, 1]
    assert o.matches("Darn, DARN") == ["darn", "darn"]


def test_lexicon_regex_words_and_errors(tmp_path):
    o = oracles.load("lexicon", words=[r"colou?r", r"\d{3}-\d{4}"], regex=True)
    assert violations(o, ["COLOR me", "colours", "call 555-1234", "5555-12345"]) == [1, 0, 1, 0]
    assert o.oracle_id.startswith("lexicon/regex/2@")
    other = oracles.load("lexicon", words=["color"])
    assert other.oracle_id != o.oracle_id
    with pytest.raises(OracleError, match="not found"):
        oracles.load("lexicon", path=str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(OracleError, match="empty"):
        oracles.load("lexicon", path=str(tmp_path / "empty.txt"))
    with pytest.raises(OracleError, match="not a regex"):
        oracles.load("lexicon", words=["(unclosed"], regex=True)


def test_lexicon_labels_through_the_transform():
    o = oracles.load("lexicon", words=["bad"])
    score, ok = o.score(["a bad day", "a good day"])
    labels, mask = oracles.make_labels(score, ok, threshold=0.5)
    assert labels.tolist() == [0.0, 1.0] and mask.all()


@pytest.fixture
def user_module(monkeypatch):
    mod = types.ModuleType("user_constraint")
    mod.__version__ = "3"
    mod.length = lambda texts: np.array([min(len(t) / 10, 1.0) for t in texts])

    def with_ok(texts):
        return [0.5] * len(texts), [t != "fail" for t in texts]

    mod.with_ok = with_ok
    mod.not_callable = 3
    monkeypatch.setitem(sys.modules, "user_constraint", mod)
    return mod


def test_callable_oracle(user_module):
    o = oracles.load("py:user_constraint:length")
    score, ok = o.score(["abcde", "x" * 30])
    np.testing.assert_allclose(score, [0.5, 1.0])
    assert ok.all() and o.oracle_id == "py:user_constraint:length@3"
    score, ok = oracles.load("py:user_constraint:with_ok").score(["fine", "fail"])
    assert ok.tolist() == [True, False] and np.isnan(score[1])
    for spec, match in [
        ("py:user_constraint", "module:function"),
        ("py:no_such_module_xyz:f", "cannot import"),
        ("py:user_constraint:missing", "has no"),
        ("py:user_constraint:not_callable", "not callable"),
    ]:
        with pytest.raises(OracleError, match=match):
            oracles.load(spec)
