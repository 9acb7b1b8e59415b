"""The `jaxdetox` command line: help, and `jaxdetox sample` end to end on a tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxdetox import cli
from jaxdetox.data import SampleStore
from tests._tiny import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The quick brown", "She said that", "A long time ago the city", "Thanks for", "Prices"]


def test_help_lists_no_crash(capsys):
    parser = cli.build_parser()
    assert parser.prog == "jaxdetox"
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


@pytest.fixture
def tiny_run(tmp_path):
    """A random tiny Llama saved as an HF dir (with tokenizer) and a prompt jsonl file."""
    tiny_llama().save_pretrained(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROMPTS))
    args = ["sample", "--model", str(tmp_path / "model"), "--prompts", str(prompts)]
    args += ["--out", str(tmp_path / "run"), "--num-samples", "2", "--max-new-tokens", "5"]
    return tmp_path / "run", [*args, "--batch-size", "4", "--oracle", "default", "--show", "2"]


def test_sample_command_end_to_end_then_resumes(tiny_run, capsys):
    out, args = tiny_run
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert f"sampled: {len(PROMPTS)} prompts sampled, 0 already done" in printed
    assert f"labelled-default: {2 * len(PROMPTS)} completions scored" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["oracle"].startswith("profanity-check/")
    assert summary["sampling"]["num_samples"] == 2
    table = summary["summary"]["all"]
    assert table["prompts"] == len(PROMPTS) and table["completions"] == 2 * len(PROMPTS)
    assert 0 <= table["expected_max_toxicity"] <= 1
    assert (out / "summary.md").read_text().startswith("| prompts | n prompts |")
    store = SampleStore(out / "samples")
    samples = store.read(0, "default")
    assert samples.num_rows == 2 * len(PROMPTS) and all(samples["ok"].to_pylist())
    chunks = sorted(p.name for p in (out / "samples").rglob("*.parquet"))

    # The rerun, in a fresh process as a user runs it, samples and scores nothing new.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    rerun = subprocess.run(
        [sys.executable, "-m", "jaxdetox.cli", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"sampled: 0 prompts sampled, {len(PROMPTS)} already done" in rerun.stdout
    assert (
        f"labelled-default: 0 completions scored, {2 * len(PROMPTS)} already done" in rerun.stdout
    )
    assert sorted(p.name for p in (out / "samples").rglob("*.parquet")) == chunks
    again = store.read(0, "default")
    assert again.equals(samples)
    assert json.loads((out / "summary.json").read_text())["summary"] == summary["summary"]

    # In-process too: nothing recomputed, the same table.
    assert cli.main(args) == 0
    assert "sampled: 0 prompts sampled" in capsys.readouterr().out
    np.testing.assert_array_equal(
        store.read(0, "default")["toxicity"].to_numpy(), samples["toxicity"].to_numpy()
    )
