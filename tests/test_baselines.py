"""Each baseline end to end on the tiny random model: its stages and its results row (each\ntakes 30–60 s on the shared 2-core machine: marked slow)."""

import json

import numpy as np
import pytest

from jaxdetox import oracles
from jaxdetox.commands.session import execute
from jaxdetox.config import ConfigError, config_from_dict
from jaxdetox.evaluate.runs import collect
from tests._tiny_run import save_tiny_model, tiny_config


class SpreadOracle(oracles.BatchOracle):
    """Deterministic fake with spread-out scores (the offline oracle ties on gibberish)."""

    oracle_id = "spread-test/v1"

    def _score_batch(self, texts):
        return np.array([(sum(map(ord, t)) % 101) / 100 for t in texts]), np.ones(len(texts), bool)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(oracles, "_FACTORIES", dict(oracles._FACTORIES))
        oracles.register("spread-test", SpreadOracle)
        yield save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _config(model_dir, method, **sections):
    """One short iteration: 8 prompts x 2 samples, 2 LLM steps, base evaluated only by `base`."""
    base = {
        "loop": {"iterations": 1, "checkpoint_every": 2},
        "train_nado": {"epochs": 1},
        "finetune": {"epochs": 1, "max_steps": 2},
        "eval": {"base": method == "base"},
        "corpus": {"source": "builtin", "seq_len": 32, "batch_size": 4},
        "oracle": {"name": "spread-test"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return config_from_dict({**tiny_config(model_dir, **base), "method": method})


def _stages(out):
    records = json.loads((out / "manifest.json").read_text())
    assert all(r["status"] == "done" for r in records)
    return [(r["iteration"], r["stage"], r["inputs"]) for r in records], records


def _row(out, method):
    rows, _ = collect([out])
    assert [r["method"] for r in rows] == [method]
    row = rows[0]
    for key in ("expected_max_toxicity", "toxicity_probability", "perplexity", "mean_toxicity"):
        assert np.isfinite(row[key]), key
    return row


LM_FLOW = [
    (1, "sample", {"lm": 0}),
    (1, "label", {"samples": 1}),
    (1, "finetune", {"lm": 0, "samples": 1}),
    (1, "eval", {"lm": 1}),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("filter_sft", {"baseline": {"keep_quantile": 0.5}}),
        ("reinforce", {"baseline": {"kl_coef": 0.1}}),
        ("dpo", {}),
    ],
)
def test_fine_tuning_baselines_run_end_to_end(model_dir, tmp_path, method, extra):
    out = tmp_path / method
    execute(_config(model_dir, method, **extra), out, progress=False)
    flow, records = _stages(out)
    assert flow == LM_FLOW
    finetune = next(r for r in records if r["stage"] == "finetune")["outputs"]
    assert finetune["method"] == method and finetune["steps"] >= 1
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m["lm/loss"]) and m["lm/grad_norm"] > 0 for m in metrics)
    if method == "filter_sft":
        assert 0 < finetune["kept_samples"] < 16
    if method == "reinforce":
        assert all(m["lm/reinforce/kl"] != 0 for m in metrics[1:])  # the policy moved
    if method == "dpo":
        assert finetune["pairs"] >= 1 and "lm/dpo/accuracy" in finetune
    assert "lm/corpus/nll" in finetune  # the corpus term rides along
    row = _row(out, method)
    assert row["kl_weight"] is None and row["seconds"] > 0
    # cost: 8 prompts x 2 training samples, each scored; + 6 eval prompts x 2 completions
    assert row["train_samples"] == 16 and row["oracle_calls"] == 16 + 12
    assert any((out / "final" / "model").glob("*.safetensors"))


@pytest.mark.slow
def test_base_and_sft_only(model_dir, tmp_path):
    base = tmp_path / "base"
    execute(_config(model_dir, "base"), base, progress=False)
    assert _stages(base)[0] == [(0, "eval", {"lm": 0})]
    sft = tmp_path / "sft_only"
    execute(_config(model_dir, "sft_only"), sft, progress=False)
    assert _stages(sft)[0] == [(1, "finetune", {"lm": 0}), (1, "eval", {"lm": 1})]
    rows, _ = collect([base, sft])
    assert [(r["method"], r.get("kl_weight")) for r in rows] == [("base", None), ("sft_only", 0.0)]
    assert (sft / "corpus" / "builtin_train_prompts.jsonl").exists()


@pytest.mark.slow
def test_nado_decoding_evaluates_guided_sampling(model_dir, tmp_path):
    out = tmp_path / "nado_decoding"
    # Two iterations, evaluated at the last only: by then NADO_0 is no longer held (and is
    # never saved), so the guided sampler must not need it.
    config = _config(
        model_dir, "nado_decoding", eval={"base": True}, baseline={"alpha": 2.0},
        loop={"iterations": 2},
    )  # fmt: skip
    execute(config, out, progress=False)
    flow, records = _stages(out)
    assert flow == [
        (0, "eval", {"lm": 0}),
        *[
            stage
            for i in (1, 2)
            for stage in (
                (i, "sample", {"lm": 0}),
                (i, "label", {"samples": i}),
                (i, "train_nado", {"lm": 0, "nado": i - 1, "samples": i}),
            )
        ],
        (2, "eval", {"lm": 0, "nado": 2}),
    ]
    rows, _ = collect([out])
    assert [r["method"] for r in rows] == ["base", "nado_decoding"]
    base, guided = rows
    # Guided samples differ from the base model's (same prompts, same seeds).
    from jaxdetox.data import SampleStore

    store = SampleStore(out / "eval" / "samples")
    texts = [store.read_samples(v)["completion_text"].to_pylist() for v in (0, 2)]
    assert texts[0] != texts[1]
    assert guided["perplexity"] != base["perplexity"]
    # the same prompts as the base row: its Δ mean toxicity is paired prompt by prompt
    assert "delta_note" not in guided and guided["paired_prompts"] == base["prompts"]
    assert guided["delta_mean_toxicity_stderr"] >= 0
    assert (out / "final" / "nado").exists()


@pytest.mark.slow
def test_lambda_sweep_writes_one_run_per_lambda(model_dir, tmp_path):
    out = tmp_path / "sweep"
    config = _config(model_dir, "lambda_sweep", baseline={"lambdas": [0.0, 2.0]})
    execute(config, out, progress=False)
    assert json.loads((out / "sweep.json").read_text())["runs"] == ["lambda_0", "lambda_2"]
    rows, _ = collect([out])
    assert [(r["method"], r["kl_weight"]) for r in rows] == [
        ("lambda_sweep", 0.0),
        ("lambda_sweep", 2.0),
    ]
    from jaxdetox.methods import is_finished

    assert is_finished(config, out)


def test_method_checks(model_dir):
    with pytest.raises(ConfigError, match="sequential scheme only"):
        _config(model_dir, "dpo", loop={"scheme": "parallel"})
    with pytest.raises(ConfigError, match="num_samples >= 2"):
        _config(model_dir, "dpo", sampling={"num_samples": 1})
    with pytest.raises(ConfigError, match="two baseline.lambdas"):
        _config(model_dir, "lambda_sweep", baseline={"lambdas": [1.0]})
    from jaxdetox.config import check_method

    with pytest.raises(ConfigError, match="expected one of"):
        check_method(_config(model_dir, "no_such_method"))
