"""`jaxdetox score` end to end on small files, through the cache."""

import json

import numpy as np
import pytest

from jaxdetox import cli, oracles

TEXTS = ["Have a lovely afternoon.", "Shut up, you stupid idiot.", "The bus is late again."]


def summary(capsys):
    return json.loads(capsys.readouterr().out)


def test_score_jsonl_with_cache(tmp_path, capsys):
    src = tmp_path / "samples.jsonl"
    src.write_text("".join(json.dumps({"id": i, "comment": t}) + "\n" for i, t in enumerate(TEXTS)))
    cache = tmp_path / "cache.sqlite"
    args = ["score", str(src), "--field", "comment", "--cache", str(cache), "--chunk-size", "2"]
    assert cli.main(args) == 0
    first = summary(capsys)
    out = tmp_path / "samples.jsonl.scored.jsonl"
    rows = [json.loads(line) for line in out.open()]
    assert [r["id"] for r in rows] == [0, 1, 2] and all(r["ok"] for r in rows)
    ref, _ = oracles.load("default").score(TEXTS)
    np.testing.assert_allclose([r["toxicity"] for r in rows], ref, rtol=1e-6)
    assert first["texts"] == 3 and first["calls"] == 2 and first["cache_hits"] == 0
    assert first["oracle_id"].startswith("profanity-check/")
    assert first["fraction_toxic_ge_0.5"] == pytest.approx(1 / 3)

    assert cli.main([*args, "--out", str(tmp_path / "again.jsonl")]) == 0
    second = summary(capsys)
    assert second["calls"] == 0 and second["cache_hits"] == 3
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()


def test_score_txt_without_cache(tmp_path, capsys):
    src = tmp_path / "lines.txt"
    src.write_text("\n".join(TEXTS) + "\n\n")
    out = tmp_path / "o" / "scored.jsonl"
    assert cli.main(["score", str(src), "--no-cache", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.open()]
    assert [r["text"] for r in rows] == TEXTS
    assert rows[1]["toxicity"] > 0.9 > 0.2 > rows[0]["toxicity"]
    assert summary(capsys)["cache"] is None


def test_score_reports_bad_input(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"body": "x"}) + "\n")
    assert cli.main(["score", str(src), "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxdetox score: error: ")
    assert "bad.jsonl:1: expected a string field 'text'" in err
    assert (
        cli.main(["score", str(src), "--no-cache", "--field", "body", "--oracle-arg", "oops"]) == 2
    )
    assert "expected KEY=VALUE" in capsys.readouterr().err
