"""The method registry and its one executor: every method declares its plan, the plans are
the flows the baselines always recorded, `method:` and the enumerated options are checked
when the config loads, and a baseline runs through the placements like the method — under
`split` into a (fake) gs:// bucket, and under `jobs` with its LLM trainer killed mid-stage
and restarted, ending with the same weights."""

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load

from jaxdetox import fileio
from jaxdetox.config import ConfigError, config_from_dict, load_config
from jaxdetox.methods import REGISTRY, is_finished, method_of, names
from jaxdetox.pipeline import flow
from tests._fake_gcs import fake_gcs
from tests._run_cli import finish, start_run
from tests._tiny_run import save_tiny_model, tiny_config, write_config
from tests.test_baselines import LM_FLOW


def _loaded(method: str, **sections) -> object:
    data = tiny_config(Path("unused"), **sections)
    if method == "sft_only":
        data["corpus"] = {"source": "builtin"}
    return config_from_dict({**data, "method": method})


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", names())
def test_every_method_plans_stages_it_can_run(name):
    config = _loaded(name, loop={"iterations": 2})
    method = method_of(name)
    stages = method.plan(config)
    assert stages and {s.name for s in stages} <= set(method.stages)
    made_by = flow.producers(stages)
    for stage in stages:  # every input is made by an earlier stage of the plan (or is a base)
        for need in stage.needs():
            assert stages.index(made_by[need]) < stages.index(stage), (stage, need)
    assert method.describe(config) and method.summary


def _flow(config) -> list[tuple[int, str, dict]]:
    stages = method_of(config.method).plan(config)
    return [(s.iteration, s.name, s.input_versions) for s in stages if s.name != "export"]


def test_baseline_plans_are_the_flows_their_runs_record():
    # The flows `test_baselines` asserts on the manifests of the baselines' runs.
    for name in ("filter_sft", "reinforce", "dpo"):
        assert _flow(_loaded(name, loop={"iterations": 1}, eval={"base": False})) == LM_FLOW
    assert _flow(_loaded("base", loop={"iterations": 1})) == [(0, "eval", {"lm": 0})]
    sft = _loaded("sft_only", loop={"iterations": 1}, eval={"base": False})
    assert _flow(sft) == [(1, "finetune", {"lm": 0}), (1, "eval", {"lm": 1})]
    # nado_decoding: every sample from the frozen base, NADO_i from NADO_i−1 decomposing it,
    # the last eval of base ⊕ NADO_2; the export writes LLM_0 and NADO_2.
    guided = _loaded("nado_decoding", loop={"iterations": 2})
    flow_ = _flow(guided)
    assert [s for s in flow_ if s[1] == "sample"] == [
        (1, "sample", {"lm": 0}),
        (2, "sample", {"lm": 0}),
    ]
    assert [s[2] for s in flow_ if s[1] == "train_nado"] == [
        {"lm": 0, "nado": i - 1, "samples": i} for i in (1, 2)
    ]
    assert [s for s in flow_ if s[1] == "eval"] == [
        (0, "eval", {"lm": 0}),
        (2, "eval", {"lm": 0, "nado": 2}),
    ]
    export = method_of("nado_decoding").plan(guided)[-1]
    assert (export.name, export.input_versions) == ("export", {"lm": 0, "nado": 2})
    # The method's plan is the scheme's data flow.
    method = _loaded("pr_parallel", loop={"scheme": "parallel"})
    assert method_of("pr_parallel").plan(method) == flow.plan_stages(method)


def test_an_unknown_method_fails_at_load_naming_the_choices():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["method=reinforse"])
    message = str(error.value)
    assert "method: unknown method 'reinforse'; did you mean 'reinforce'?" in message
    assert f"expected one of {', '.join(names())}" in message
    assert set(names()) == set(REGISTRY) >= {"pr_sequential", "pr_parallel", "dpo", "base"}
    # `jaxdetox eval` labels a row with any name: that config is not run.
    assert load_config(None, ["method=my_model"], executes=False).method == "my_model"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "loop.placement=splitt",
            "loop.placement: Input should be 'colocated', 'split', 'jobs' or 'joint'",
        ),
        ("loop.scheme=paralel", "loop.scheme: Input should be 'sequential' or 'parallel'"),
        ("train_nado.consistency=kll", "train_nado.consistency: Input should be 'kl', "),
        ("finetune.optimizer.schedule=cosin", "Input should be 'constant', 'cosine' or 'linear'"),
        ("nado.head=factorised", "nado.head: Input should be 'linear' or 'factored'"),
    ],
)
def test_a_mistyped_option_fails_at_load_naming_the_choices(override, expected):
    with pytest.raises(ConfigError, match="invalid configuration") as error:
        load_config(None, [override])
    assert expected in str(error.value)


def test_method_rules_come_from_the_registry():
    with pytest.raises(ConfigError, match="method 'reinforce' runs the sequential scheme only"):
        _loaded("reinforce", loop={"scheme": "parallel"})
    with pytest.raises(ConfigError, match="method 'base' only evaluates"):
        _loaded("base", eval={"base": False})
    # Baselines are no longer tied to one mesh: they run under every placement.
    jobs = _loaded("dpo", loop={"placement": "jobs"})
    assert {s.role for s in method_of("dpo").plan(jobs)} == {"sampler", "lm"}


# ----------------------------------------------------------------------------- placements


def _config(model_dir: Path, **loop) -> dict:
    """reinforce, one iteration: 16 samples, 12 LLM steps (checkpoints every 2)."""
    return {
        **tiny_config(
            model_dir,
            loop={"iterations": 1, "checkpoint_every": 2, **loop},
            finetune={"epochs": 6},
            eval={"base": False},
        ),
        "method": "reinforce",
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def gcs():
    with fake_gcs("jd-methods-bucket") as root:
        yield root


def _weights(out) -> dict[str, np.ndarray]:
    """The exported LLM's tensors (local or on the bucket)."""
    return load((fileio.as_path(out) / "final" / "model" / "model.safetensors").read_bytes())


@pytest.fixture(scope="module")
def split_run(model_dir, gcs):
    """reinforce under `split` (2 devices per role) into the fake bucket."""
    from jaxdetox.commands.session import execute

    roles = {"sampler": 2, "nado": 2, "lm": 2}
    config = config_from_dict(_config(model_dir, placement="split", roles=roles))
    out = fileio.as_path(f"{gcs}/runs/reinforce-split")
    assert execute(config, out, progress=False) == 0
    return config, out


@pytest.mark.slow
def test_a_baseline_runs_split_and_exports_to_gcs(split_run):
    from jaxdetox.pipeline.rundir import read_manifest

    config, out = split_run
    records = read_manifest(out)
    assert [(r["iteration"], r["stage"], r["inputs"]) for r in records] == _flow(config)
    assert all(r["status"] == "done" for r in records)
    assert {r["stage"]: r["role"] for r in records} == {
        "sample": "sampler", "label": "sampler", "finetune": "lm", "eval": "sampler",
    }  # fmt: skip
    assert all(r["devices"] == 2 for r in records)
    finetune = next(r for r in records if r["stage"] == "finetune")["outputs"]
    assert finetune["method"] == "reinforce" and finetune["steps"] == 12
    # The export was staged locally and uploaded: the HF checkpoint is on the bucket.
    final = out / "final" / "model"
    assert str(final).startswith("gs://")
    assert {"config.json", "model.safetensors"} <= {p.name for p in final.iterdir()}
    assert is_finished(config, out)
    # A rerun resumes a finished run: nothing is recomputed.
    from jaxdetox.commands.session import execute

    before = (out / "manifest.json").read_text()
    assert execute(config, out, progress=False) == 0
    assert (out / "manifest.json").read_text() == before


def _finetune_steps(out: Path) -> int:
    path = out / "metrics.lm.jsonl"
    if not path.exists():
        return 0
    return sum(json.loads(x)["stage"] == "finetune" for x in path.read_text().splitlines() if x)


@pytest.mark.slow
def test_a_baseline_under_jobs_resumes_a_killed_trainer(split_run, model_dir, tmp_path):
    from jaxdetox.pipeline.rundir import RunDir

    config_dict = _config(model_dir, placement="jobs", poll_seconds=0.2)
    config = write_config(tmp_path / "jobs.yaml", config_dict)
    out = tmp_path / "run"
    procs = {role: start_run(config, out, "--role", role) for role in ("sampler", "nado", "lm")}
    deadline = time.time() + 600
    while _finetune_steps(out) < 5:  # the LLM trainer, mid-stage
        assert procs["lm"].poll() is None, procs["lm"].communicate()[0]
        assert time.time() < deadline, "the finetune stage never started"
        time.sleep(0.01)
    procs["lm"].send_signal(signal.SIGKILL)
    procs["lm"].wait()
    assert RunDir(out).record(1, "finetune")["status"] == "running"  # killed mid-stage
    # The NADO trainer has no stage in this method: it finishes at once, the run not yet.
    assert "the run completes when the other roles finish" in finish(procs["nado"])
    finish(start_run(config, out, "--role", "lm"))
    finish(procs["sampler"])

    merged = json.loads((out / "manifest.json").read_text())  # written by the last role
    assert [(r["iteration"], r["stage"], r["inputs"]) for r in merged] == _flow(
        config_from_dict(config_dict)
    )
    resumed = next(r for r in merged if r["stage"] == "finetune")
    assert resumed["outputs"]["resumed_from_step"] > 0 and resumed["outputs"]["steps"] == 12
    assert is_finished(config_from_dict(config_dict), out)
    # Every role's mesh has 2 devices in both placements: the same programs, the same weights.
    jobs, split = _weights(out), _weights(split_run[1])
    assert jobs.keys() == split.keys()
    for name in jobs:
        np.testing.assert_array_equal(jobs[name], split[name], err_msg=name)
