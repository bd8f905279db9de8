"""`ift launch` on one machine or a hostfile: the exact DeepSpeed command (`--dry-run`), the refusals, and one real
launch through DeepSpeed's runner (two CPU ranks of the Slurm tests' stand-in trainer) stopped by SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ift_dist import exit_codes
from ift_dist.config import ConfigError
from ift_dist.launcher import process
from ift_dist.launcher.local import LaunchError, LocalLaunch, launch_local, plan_local

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "tiny_cpu.yaml")
STANDIN = REPO / "tests" / "slurm" / "standin.py"
TWO_GPUS = "GPU 0: NVIDIA H100 (UUID: GPU-a)\nGPU 1: NVIDIA H100 (UUID: GPU-b)\n"


def plan(*, env=None, gpus="", overrides=(), **options):
    return plan_local(
        CONFIG,
        ["output_dir=runs/x", *overrides],
        environ=env or {},
        python="/venv/bin/python",
        list_gpus=lambda: gpus,
        master_port=options.pop("master_port", 29600),
        **options,
    )


def test_cpu_machine_runs_n_cpu_ranks():
    launch = plan(nproc=2)
    assert launch.command == [
        "/venv/bin/python",
        "-u",
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--log_level",
        "error",
        "--master_port",
        "29600",
        "--enable_each_rank_log",
        "runs/x/logs",
        "--module",
        "ift_dist.train",
        CONFIG,
        "output_dir=runs/x",
    ]
    assert launch.env_updates["DS_ACCELERATOR"] == "cpu"
    assert launch.world_size == 2
    assert "--enable_each_rank_log" not in plan(nproc=2, rank_logs=False).command
    line = launch.shell_line()
    assert line.startswith("env ") and shlex.split(line)[-3:] == [
        "ift_dist.train",
        CONFIG,
        "output_dir=runs/x",
    ]


def test_gpu_machine_uses_every_gpu_by_default():
    launch = plan(gpus=TWO_GPUS)
    assert launch.command[4:6] == ["--num_gpus", "2"] and "DS_ACCELERATOR" not in launch.env_updates
    with pytest.raises(LaunchError, match="only 2 GPU"):
        plan(gpus=TWO_GPUS, nproc=4)


def test_visible_devices_are_kept_with_include():
    launch = plan(env={"CUDA_VISIBLE_DEVICES": "2,3"}, gpus=TWO_GPUS, overrides=["train.global_batch_rows=2"])
    assert launch.command[4:6] == ["--include", "localhost:2,3"]
    assert plan(env={"CUDA_VISIBLE_DEVICES": "2,3"}, nproc=1).command[4:6] == ["--include", "localhost:2"]


def test_user_environment_wins():
    launch = plan(env={"OMP_NUM_THREADS": "7", "DS_ACCELERATOR": "cpu"}, gpus=TWO_GPUS, nproc=2)
    assert "OMP_NUM_THREADS" not in launch.env_updates and "DS_ACCELERATOR" not in launch.env_updates
    assert launch.command[4:6] == ["--num_gpus", "2"]


def test_batch_geometry_is_checked_for_the_world_size():
    with pytest.raises(ConfigError, match=r"train\.global_batch_rows"):
        plan(nproc=3)
    with pytest.raises(ConfigError, match="no_such_key"):
        plan(overrides=["train.no_such_key=1"])


def test_hostfile_over_ssh_and_without(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    over_ssh = plan(hostfile=str(hostfile))
    assert over_ssh.command[4:10] == [
        "--hostfile",
        str(hostfile),
        "--master_port",
        "29600",
        "--enable_each_rank_log",
        "runs/x/logs",
    ]
    assert over_ssh.world_size == 2 and not over_ssh.follow_rank_log
    assert any("~/.deepspeed_env" in note for note in over_ssh.notes)
    per_host = plan(hostfile=str(hostfile), node_rank=1)
    assert per_host.command[4:12] == [
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        "1",
        "--master_addr",
        "node-a",  # the first host of the hostfile
        "--master_port",
    ]
    with pytest.raises(LaunchError, match="2 hosts"):
        plan(hostfile=str(hostfile), node_rank=2)
    with pytest.raises(LaunchError, match="needs --hostfile"):
        plan(node_rank=0)


def test_busy_default_port_is_replaced():
    with socket.socket() as holder:
        # If someone else holds 29500 already, the launcher must avoid it all the same.
        with contextlib.suppress(OSError):
            holder.bind(("", 29500))
        holder.listen()
        launch = plan(master_port=None)
    port = int(launch.command[launch.command.index("--master_port") + 1])
    assert port != 29500


def test_dry_run_prints_the_command_and_starts_nothing(tmp_path):
    # No GPU and no inherited accelerator choice: the launcher itself must pick the CPU accelerator.
    env = {**{k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}, "CUDA_VISIBLE_DEVICES": ""}
    command = [str(Path(sys.executable).with_name("ift")), "launch", CONFIG, f"output_dir={tmp_path}/run"]
    result = subprocess.run(
        [*command, "--nproc=2", "--master-port=29611", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    assert words[0] == "env" and "DS_ACCELERATOR=cpu" in words
    assert words[words.index("--num_gpus") + 1] == "2" and words[words.index("--master_port") + 1] == "29611"
    assert not (tmp_path / "run").exists()
    refused = subprocess.run(
        [*command, "--nproc=3", "--dry-run"], capture_output=True, text=True, env=env, timeout=60
    )
    assert refused.returncode == exit_codes.CONFIG_ERROR and "global_batch_rows" in refused.stderr
    slurm_only = subprocess.run(
        [*command, "--nodes=2", "--dry-run"], capture_output=True, text=True, env=env, timeout=60
    )
    assert slurm_only.returncode == exit_codes.CONFIG_ERROR and "need --slurm" in slurm_only.stderr


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_launch_runs_deepspeed_and_turns_sigterm_into_a_checkpoint(tmp_path):
    """The real chain: ift launch -> DeepSpeed's runner -> its per-node launcher -> 2 CPU ranks. SIGTERM to `ift
    launch` reaches the ranks as SIGUSR1 (DeepSpeed's launchers ignore it), they checkpoint and exit 85, and `ift
    launch` returns 85; rank 0's log is copied to its stdout."""
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "IFT_LAUNCH_TRAINING_SCRIPT": str(STANDIN),
        "STANDIN_STEPS": "200",
        "STANDIN_STEP_SECONDS": "0.2",
    }
    command = [
        str(Path(sys.executable).with_name("ift")),
        "launch",
        CONFIG,
        f"output_dir={run_dir}",
        "--nproc=2",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    events_file = run_dir / "standin" / "events.jsonl"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            steps = (
                [json.loads(line) for line in events_file.read_text().splitlines()]
                if events_file.exists()
                else []
            )
            if {event["rank"] for event in steps if event["event"] == "step"} == {0, 1}:
                break
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = output.decode()
    assert process.returncode == exit_codes.REQUEUE, text
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    checkpoints = [event for event in events if event["event"] == "checkpoint"]
    assert sorted(event["rank"] for event in checkpoints) == [0, 1]
    assert all(event["signal"] == "SIGUSR1" and event["step"] < 200 for event in checkpoints)
    starts = [event for event in events if event["event"] == "start"]
    assert [event["peers"] for event in starts if event["rank"] == 0] == [
        ["0@?", "1@?"]
    ]  # met at MASTER_ADDR:PORT
    assert "SIGTERM: asking the training processes to checkpoint and stop (SIGUSR1)" in text
    assert "standin {'event': 'start', 'rank': 0" in text  # rank 0's log, copied to the console
    assert sorted(path.name.split("_")[1] for path in (run_dir / "logs").glob("*.log")) == [
        "rank0.log",
        "rank1.log",
    ]


# Rank 0's last act in a finished run, then a teardown crash (SIGABRT); or the crash alone.
ABORT_AFTER_FINISHING = """
import os, sys
from ift_dist.exit_codes import write_finished_record
if sys.argv[1] == "finished":
    write_finished_record(3, "runs/x")
os.abort()
"""


@pytest.mark.parametrize("finished", [True, False])
def test_launch_local_reports_a_finished_run_as_done_whatever_its_teardown(tmp_path, monkeypatch, finished):
    monkeypatch.setattr(process, "FINISHED_RECORD_PATIENCE_SECONDS", 0.5)
    script = tmp_path / "train.py"
    script.write_text(ABORT_AFTER_FINISHING)
    command = [sys.executable, str(script), "finished" if finished else "unfinished"]
    launch = LocalLaunch(command, {}, world_size=1, log_dir=None)
    code = launch_local(launch, dict(os.environ))
    assert code == (0 if finished else 128 + signal.SIGABRT)
