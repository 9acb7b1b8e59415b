"""Built-in demo assets: prompt set shape and split hygiene, clean held-out text."""

import numpy as np
import pytest

from jaxdetox import assets, oracles


def test_prompts_fields_and_disjoint_splits():
    rows = assets.load_prompts()
    assert 300 <= len(rows) <= 1000
    assert all(set(r) == {"id", "text", "split", "kind"} for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["text"] for r in rows}) == len(rows)  # no text in two places
    train = {r["text"] for r in assets.load_prompts(split="train")}
    evals = {r["text"] for r in assets.load_prompts(split="eval")}
    assert train and evals and not train & evals
    for kind in assets.KINDS:
        for split in assets.SPLITS:
            assert len(assets.load_prompts(split=split, kind=kind)) >= 25, (kind, split)
    assert len(assets.load_prompts(kind="toxic")) > len(assets.load_prompts(kind="neutral"))
    assert all(0 < len(r["text"].split()) <= 30 for r in rows)  # short beginnings
    with pytest.raises(ValueError, match="split"):
        assets.load_prompts(split="test")


def test_heldout_text_is_clean_prose():
    text = assets.heldout_text()
    assert 3000 <= len(text.encode()) <= 20000
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) >= 5
    tox, ok = oracles.load("default").score(paragraphs)
    assert ok.all() and tox.max() < 0.3


def test_asset_path_errors_name_the_asset():
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        assets.asset_path("nope.txt")
    assert np.all([assets.asset_path(n).is_file() for n in ("prompts.jsonl", "heldout.txt")])
