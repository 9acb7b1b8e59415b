"""The benchmark suite's machinery: report schema, schedule arithmetic, FLOP counter (no timing)."""

import json

import pytest

from benchmarks import run, schedule
from jaxdetox.models import ModelConfig
from jaxdetox.train import flops


def _config(family: str) -> ModelConfig:
    return ModelConfig(
        family=family, vocab_size=50, hidden_size=8, num_layers=3, num_heads=2, num_kv_heads=2,
        head_dim=4, intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip


@pytest.mark.parametrize("family, mlp_mats", [("gpt2", 2), ("llama", 3)])
def test_flop_counter_matches_a_hand_count(family, mlp_mats):
    cfg, t, tokens = _config(family), 10, 20
    # Per token and layer: q, k, v, o are [8, 8] (2·64 FLOPs each), the MLP 2 or 3 [8, 32]
    # matrices, attention scores + weighted sum 2 · heads · head_dim · T.
    per_layer = 4 * 2 * 8 * 8 + mlp_mats * 2 * 8 * 32 + 2 * 2 * 4 * t
    body = 3 * per_layer
    head = 2 * 8 * 50
    f = flops.lm_step_flops(cfg, None, tokens=tokens, kl_tokens=0, seq_len=t)
    assert f.lm == 3 * tokens * (body + head)  # forward + backward (2×) of the student
    assert f.reference == f.nado == 0
    # Joint step: reference forward, a 1-layer NADO body + head forward and backward.
    nado = cfg.replace(num_layers=1)
    j = flops.lm_step_flops(
        cfg, nado, tokens=tokens, kl_tokens=tokens, seq_len=t, nado_trained=True
    )
    assert j.reference == tokens * (body + head)
    assert j.nado == 3 * tokens * (per_layer + head)
    assert j.total == j.lm + j.reference + j.nado


def _manifest(path):
    records = [
        {"iteration": 1, "stage": "sample", "inputs": {"lm": 0}, "seconds": 2.0},
        {"iteration": 1, "stage": "label", "inputs": {"samples": 0}, "seconds": 1.0},
        {"iteration": 1, "stage": "train_nado", "inputs": {}, "seconds": 4.0},
        {"iteration": 1, "stage": "finetune", "inputs": {}, "seconds": 5.0, "device_seconds": 20.0},
        {"iteration": 2, "stage": "sample", "inputs": {"lm": 1}, "seconds": 6.0},
        {"iteration": 2, "stage": "eval", "inputs": {"lm": 1}, "seconds": 1.0},
    ]
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps(records))
    return path


def test_schedule_sequential_is_the_sum_parallel_the_slowest_lane(tmp_path):
    result = schedule.schedule(
        schedule.read_manifest(_manifest(tmp_path / "run")), devices=2, handover_s=0.5
    )
    first, second = result["iterations"]
    assert first["sequential_s"] == 12.0
    assert first["parallel_s"] == 5.5  # finetune lane 5 s + hand-over
    assert first["bottleneck"] == "llm"
    # device-seconds: finetune's own 20, the rest 2 devices x seconds; parallel holds
    # data (2) + nado (2) + llm (20 / 5 = 4) devices for 5.5 s.
    assert first["sequential_device_s"] == 20.0 + 2 * (2 + 1 + 4)
    assert first["parallel_device_s"] == 5.5 * 8
    assert result["full_iterations"] == [1]  # iteration 2 lacks the NADO and LLM lanes
    assert "| 1 | 12.0 | 5.5 |" in schedule.table(result)


def test_schedule_names_a_bad_record(tmp_path):
    (tmp_path / "manifest.json").write_text(
        json.dumps([{"iteration": 1, "stage": "x", "seconds": 1}])
    )
    with pytest.raises(ValueError, match="stage 'x'"):
        schedule.read_manifest(tmp_path)


def test_suite_report_schema(tmp_path, capsys):
    out = tmp_path / "suite.json"
    args = run.parse_args(
        ["--quick", "--only", "schemes,accelerator", "--out", str(out),
         "--manifest", str(_manifest(tmp_path / "run"))]
    )  # fmt: skip
    report = run.run_suites(args)
    written = json.loads(out.read_text())
    run.validate(written)
    assert list(written["summary"]) == list(run.SUMMARY_KEYS)
    assert written["summary"]["mfu"] is None  # CPU: the accelerator suite is skipped
    assert "skipped" in written["suites"]["accelerator"]
    assert written["suites"]["schemes"]["figures"]["total_over_full_iterations"] == {
        "sequential_s": 12.0, "parallel_s": 5.0,
    }  # fmt: skip
    assert written["goals"]["mfu"] == {"goal": ">= 0.45", "value": None, "met": None}
    assert "| `train_step_time_vs_hf` | ≤ 0.9 | — | not measured |" in report["table"]
    broken = {**written, "summary": {k: v for k, v in written["summary"].items() if k != "mfu"}}
    with pytest.raises(ValueError, match="summary keys"):
        run.validate(broken)
    with pytest.raises(ValueError, match="machine lacks"):
        run.validate({**written, "machine": {}})


def test_goal_met_directions():
    assert run.goal_met("train_step_time_vs_hf", 0.84) is True
    assert run.goal_met("train_step_time_vs_hf", 0.95) is False
    assert run.goal_met("sampler_rtp_vs_hf", 2.5) is True
    assert run.goal_met("mfu", None) is None


def test_mfu_code_path_on_a_tiny_llama():
    from benchmarks import mfu

    out = mfu.train_step_mfu(_config("llama").replace(dtype="float32"), batch=2, length=16, reps=1)
    assert (
        out["model_flops"]
        == flops.lm_step_flops(_config("llama"), None, tokens=32, kl_tokens=0, seq_len=16).lm
    )
    assert out["mfu"] > 0 and out["peak_flops"] > 0 and len(out["s"]["sft"]) == 1


def test_every_summary_key_belongs_to_one_suite_and_merge_keeps_the_others(tmp_path):
    keys = [k for suite in run.SUITES for k in run.SUITE_SUMMARY_KEYS[suite]]
    assert sorted(keys) == sorted(run.SUMMARY_KEYS)
    out, manifest = tmp_path / "suite.json", str(_manifest(tmp_path / "run"))
    run.run_suites(run.parse_args(["--only", "schemes", "--out", str(out), "--manifest", manifest]))
    merged = run.run_suites(run.parse_args(["--only", "accelerator", "--out", str(out), "--merge"]))
    assert set(merged["suites"]) == {"schemes", "accelerator"}
    assert merged["merged"][0]["suites"] == ["schemes"]
    run.validate(json.loads(out.read_text()))
