"""Two constraints through the sequential loop on the tiny model: each constraint's oracle
labels the samples, one NADO per constraint, the teacher sums their guidance, and the eval
reports each constraint's satisfaction."""

import json

import pytest

from jaxdetox.commands.session import execute
from jaxdetox.config import ConfigError, config_from_dict
from tests._tiny_run import save_tiny_model, tiny_config

LEXICON = {
    "name": "no_the",
    "alpha": 2.0,
    "oracle": {"name": "lexicon", "args": {"words": ["the"]}},
}


def test_constraints_config_validation(tmp_path):
    base = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match="unique"):
        config_from_dict({**base, "constraints": [LEXICON, LEXICON]})
    with pytest.raises(ConfigError, match="sequential"):
        config_from_dict({**base, "constraints": [LEXICON], "loop": {"scheme": "parallel"}})
    with pytest.raises(ConfigError, match="constraints.0.name"):
        config_from_dict({**base, "constraints": [{**LEXICON, "name": "Bad Name"}]})


@pytest.mark.slow
def test_two_constraints_run(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    config = {
        **tiny_config(model_dir, loop={"iterations": 1, "checkpoint_every": 2}),
        "constraints": [LEXICON],
    }
    out = tmp_path / "run"
    execute(config_from_dict(config), out, progress=False)
    records = {
        (r["iteration"], r["stage"]): r for r in json.loads((out / "manifest.json").read_text())
    }
    label = records[(1, "label")]["outputs"]
    assert label["scored_no_the"] == label["scored"] > 0
    nado = records[(1, "train_nado")]["outputs"]
    assert nado["nado/bce/no_the"] > 0
    stage = out / "iter_001" / "train_nado"
    assert (stage / "artifact").is_dir() and (stage / "artifact_no_the").is_dir()
    # Both NADOs' resume checkpoints went once the stage was done (keep_stage_checkpoints).
    assert not (stage / "ckpt").exists() and not (stage / "ckpt_no_the").exists()
    assert (out / "final" / "nado_no_the" / "nado_config.json").is_file()
    for version in (0, 1):
        metrics = records[(version, "eval")]["outputs"]["constraints"]
        assert set(metrics) == {"default", "no_the"}
        assert 0 <= metrics["no_the"]["satisfaction"] <= 1 and metrics["no_the"]["scored"] > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kl = [r["lm/samples/kl"] for r in lines if r["stage"] == "finetune"]
    assert kl and all(k >= 0 for k in kl)
