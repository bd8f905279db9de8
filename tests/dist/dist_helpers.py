"""Running the real training entry point as a test: `launch` starts `deepspeed` (or `ift train`) on
configs/tiny_cpu.yaml with its own rendezvous port and a hang timeout that kills every rank and prints their output;
`Run` reads what the run wrote."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
# The first run on a machine JIT-builds DeepSpeed's shared-memory op (~1 minute); later runs take ~30 s.
HANG_TIMEOUT = 420


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Run:
    output_dir: Path
    returncode: int
    output: str
    port: str = ""

    def records(self) -> list[dict[str, Any]]:
        lines = (self.output_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def train_records(self) -> list[dict[str, Any]]:
        return [record for record in self.records() if "loss" in record]

    def eval_records(self) -> list[dict[str, Any]]:
        return [record for record in self.records() if "eval_loss" in record]

    def weights(self) -> dict[str, Any]:
        """The fp32 weights of the checkpoint saved at the end, consolidated from the ZeRO-3 shards."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        directory = self.output_dir / "checkpoints"
        tag = (directory / "latest").read_text().strip()
        return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)


def launch(
    output_dir: Path,
    overrides: list[str],
    *,
    ranks: int = 2,
    timeout: float = HANG_TIMEOUT,
    via_ift: bool = False,
) -> Run:
    """`deepspeed --num_gpus RANKS --module ift_dist.train configs/tiny_cpu.yaml output_dir=... OVERRIDES`, on the CPU
    (`via_ift`: the same through `ift train ... --num-gpus RANKS`).

    Every rank runs in the launcher's process group (a new session): on a hang the whole group is killed and the
    test fails with every rank's output."""
    output_dir.mkdir(parents=True, exist_ok=True)
    port, arguments = str(free_port()), [str(TINY_CONFIG), f"output_dir={output_dir}", *overrides]
    if via_ift:
        command = [str(Path(sys.executable).with_name("ift")), "train", *arguments]
        command += ["--num-gpus", str(ranks), "--master-port", port, "--no-rank-logs"]
    else:
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
        command += ["--master_port", port, "--module", "ift_dist.train", *arguments]
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",  # CPU ranks even on a machine with GPUs
        "PYTHONUNBUFFERED": "1",
    }
    log_path = output_dir.parent / f"{output_dir.name}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"training hung for {timeout} s; every rank killed. Output:\n{log_path.read_text()}")
    return Run(output_dir, process.returncode, log_path.read_text(), port)


def check(run: Run) -> Run:
    assert run.returncode == 0, f"training failed ({run.returncode}):\n{run.output[-20000:]}"
    return run
