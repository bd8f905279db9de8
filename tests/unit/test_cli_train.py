"""`ift train`: the local path of `ift launch` (the same plan, the same checks before any rank starts, the training's
exit code), with --num-gpus as the rank count."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ift_dist import exit_codes
from ift_dist.cli import main as ift_main

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "tiny_cpu.yaml")
IFT = str(Path(sys.executable).with_name("ift"))
STANDIN = REPO / "tests" / "slurm" / "standin.py"


def cpu_environment(**extra: str) -> dict[str, str]:
    """No GPU and no inherited accelerator choice: the launcher itself picks the CPU accelerator."""
    environment = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    return {**environment, "CUDA_VISIBLE_DEVICES": "", **extra}


def test_train_plans_exactly_what_launch_plans(tmp_path, capsys):
    common = [CONFIG, f"output_dir={tmp_path}/run", "--master-port=29613", "--dry-run"]
    assert ift_main(["train", *common, "--num-gpus=2"]) == exit_codes.OK
    train = capsys.readouterr().out
    assert ift_main(["launch", *common, "--nproc=2"]) == exit_codes.OK
    assert train == capsys.readouterr().out
    assert "--num_gpus 2" in train and "--enable_each_rank_log" in train
    assert not (tmp_path / "run").exists()


def test_help_describes_the_cpu_default_the_same_way(capsys):
    texts = []
    for command in (["train", "--help"], ["launch", "--help"]):
        with pytest.raises(SystemExit):
            ift_main(command)
        texts.append(" ".join(capsys.readouterr().out.split()))
    train, launch = texts
    assert (
        "--num-gpus N ranks on this machine (default: every GPU; without CUDA: 1 rank, on the CPU)" in train
    )
    assert "without CUDA: 1 rank, on the CPU)" in launch


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_missing_data_file_is_one_config_error_before_any_rank_starts(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        IFT,
        "train",
        CONFIG,
        "data.sources[1].path=../shared/data/no_such.json",
        f"output_dir={run_dir}",
    ]
    started = time.monotonic()
    result = subprocess.run(
        [*command, "--num-gpus", "2"],
        capture_output=True,
        text=True,
        env=cpu_environment(),
        cwd=REPO,
        timeout=90,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == exit_codes.CONFIG_ERROR, result.stderr
    assert result.stderr.splitlines() == [
        f"ift: config error: data.sources[1].path: ../shared/data/no_such.json does not exist (relative paths "
        f"resolve against the working directory {REPO}; the config file is {CONFIG})"
    ]
    assert result.stdout == ""  # no launcher line, no rank output
    assert not run_dir.exists()  # no rank log directory either
    assert elapsed < 30, (
        f"{elapsed:.1f} s: the check must not wait for the ranks"
    )  # ~1 s; the CI machine is busy


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_train_runs_the_ranks_and_returns_their_exit_code(tmp_path):
    """Through DeepSpeed's runner to one CPU rank of the Slurm tests' stand-in trainer, which asks for a requeue
    (85) after one step: `ift train` returns 85, and the rank's log is in <output_dir>/logs and on the console."""
    run_dir = tmp_path / "run"
    environment = cpu_environment(
        IFT_LAUNCH_TRAINING_SCRIPT=str(STANDIN), STANDIN_ALWAYS_REQUEUE="1", STANDIN_STEP_SECONDS="0.05"
    )
    result = subprocess.run(
        [IFT, "train", CONFIG, f"output_dir={run_dir}", "--num-gpus=1"],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO,
        timeout=240,
    )
    assert result.returncode == exit_codes.REQUEUE, result.stdout + result.stderr
    assert "standin {'event': 'start', 'rank': 0" in result.stdout  # rank 0's log, copied to the console
    assert [path.name.split("_")[1] for path in (run_dir / "logs").glob("*.log")] == ["rank0.log"]
