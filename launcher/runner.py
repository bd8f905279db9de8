"""Builds the command line of DeepSpeed's runner (`python -m deepspeed.launcher.runner ...`, what the `deepspeed`
script runs) that starts the trainer, and the environment variables its ranks need.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path

TRAIN_MODULE = "ift_dist.train"
# Test hook, never set it otherwise: a Python file that DeepSpeed's launcher runs on every rank in place of
# `-m ift_dist.train`, with the same arguments (tests/slurm/ runs a stand-in trainer this way).
TRAINING_SCRIPT_HOOK = "IFT_LAUNCH_TRAINING_SCRIPT"


def training_target(environ: Mapping[str, str]) -> list[str]:
    """What each rank runs: `--module ift_dist.train`, or the test hook's file."""
    script = environ.get(TRAINING_SCRIPT_HOOK)
    return [script] if script else ["--module", TRAIN_MODULE]


def runner_command(
    python: str,
    runner_args: list[str],
    training_args: list[str],
    environ: Mapping[str, str],
    log_dir: Path | None = None,
) -> list[str]:
    """`python -u -m deepspeed.launcher.runner RUNNER_ARGS [--enable_each_rank_log DIR] --module ift_dist.train
    CONFIG OVERRIDES`. The runner of this very interpreter (not whatever `deepspeed` is first on PATH), so the ranks
    run in the environment that validated the config."""
    command = [python, "-u", "-m", "deepspeed.launcher.runner", *runner_args]
    if log_dir is not None:
        # DeepSpeed writes <log_dir>/<start time>_rank<N>.log, one file per rank, stdout and stderr together.
        command += ["--enable_each_rank_log", str(log_dir)]
    return [*command, *training_target(environ), *training_args]


def rank_environment(environ: Mapping[str, str], *, cpu: bool, ranks_per_node: int) -> dict[str, str]:
    """Variables to add for the ranks; values already in `environ` win (the user's choice)."""
    wanted = {
        # One compute thread per core share: torch would otherwise start one thread per core in every rank.
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, ranks_per_node))),
        "PYTHONUNBUFFERED": "1",
        # A rank that dies of SIGSEGV/SIGABRT (a CUDA or NCCL crash) prints its Python stack first.
        "PYTHONFAULTHANDLER": "1",
    }
    if cpu:
        wanted["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator: gloo, no CUDA
    return {key: value for key, value in wanted.items() if key not in environ}


def shell_line(command: list[str], env_updates: Mapping[str, str]) -> str:
    """The exact command as one line a shell runs unchanged (`--dry-run` prints it)."""
    prefix = ["env", *(f"{key}={value}" for key, value in env_updates.items())] if env_updates else []
    return shlex.join([*prefix, *command])
