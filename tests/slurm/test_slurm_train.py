"""The real trainer under the real batch script, on the private two-node Slurm cluster: `ift launch --slurm --submit`
runs `python -m ift_dist.train` (ZeRO-3, 2 nodes x 1 CPU rank over gloo) on the tiny random Llama; the time-limit
notice, forced in the middle of training, makes it save a checkpoint and exit REQUEUE, the script requeues the job,
and the rerun resumes from `latest` and finishes: every step's loss and data equal an uninterrupted run's.

The uninterrupted reference is plain `deepspeed --num_gpus 2 --module ift_dist.train` outside Slurm, with the same
config and overrides, started beside the Slurm job to save wall time (the numbers do not depend on timing).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ift_dist.checkpoint import verify

pytestmark = [pytest.mark.slurm, pytest.mark.dist, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_cpu.yaml"
STEPS = 8
# 2 nodes x 1 rank. The stop timeout must cover the rest of one step plus one save: generous, as the test machine
# is shared; a hung save would show up as "the training has not stopped" in the job output.
LAUNCH = (
    "--nodes=2",
    "--nproc=1",
    "--time=10",
    "--signal-seconds=120",
    "--stop-timeout=90",
    "--max-restarts=1",
)
# Per-step numbers an interrupted run must reproduce: the same data and schedule exactly, the numerics within 1e-6.
EXACT_KEYS = ("step", "lr", "tokens", "supervised_tokens", "samples", "rows")
CLOSE_KEYS = ("loss", "grad_norm")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("slurm-train") / "tiny-llama"
    subprocess.run(
        [sys.executable, str(REPO / "tests" / "tiny_model.py"), str(directory)],
        check=True,
        timeout=120,
    )
    return directory


def overrides(tiny_model: Path) -> list[str]:
    """8 steps of 2 rows per rank (2 accumulation steps), no evaluation, no sample answers and no export: the
    checkpoint on the notice and the one at the end are the only saves."""
    return [
        f"model.name_or_path={tiny_model}",
        f"train.max_steps={STEPS}",
        "train.sample_prompts=[]",
        "data.eval_sources=[]",
        "export.at_end=false",
        "checkpoint.keep_last=0",
    ]


def start_reference(output_dir: Path, arguments: list[str]) -> tuple[subprocess.Popen, Path]:
    """`deepspeed --num_gpus 2 --module ift_dist.train CONFIG output_dir=... ARGUMENTS` on the CPU, in its own
    session (so a hang can be ended by killing its process group); returns at once."""
    output_dir.mkdir(parents=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port]
    command += ["--module", "ift_dist.train", str(CONFIG), f"output_dir={output_dir}", *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    environment.pop("SLURM_CONF", None)
    log_path = output_dir.parent / "reference.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
    return process, log_path


def finish_reference(process: subprocess.Popen, log_path: Path, timeout: float = 300) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == 0, (
        f"the reference run failed ({process.returncode}):\n{log_path.read_text()}"
    )


def train_records(output_dir: Path) -> dict[int, dict]:
    path = output_dir / "metrics.jsonl"
    records = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )
    return {record["step"]: record for record in records if "loss" in record}


def wait_for_step(job, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(train_records(job.output_dir), default=0) >= step:
            return
        if job.state().get("JobState") not in ("RUNNING", "PENDING", "CONFIGURING"):
            break
        time.sleep(0.2)
    raise AssertionError(f"the job did not reach step {step}\n{job.describe()}")


def test_time_limit_notice_checkpoints_requeues_and_resumes_the_real_training(submit, tiny_model, tmp_path):
    arguments = overrides(tiny_model)
    started = time.monotonic()
    job = submit(*LAUNCH, overrides=tuple(arguments), training_script=None, config=CONFIG)
    reference, reference_log = start_reference(tmp_path / "reference", arguments)
    try:
        wait_for_step(job, 2)
        job.cluster.run("scancel", "--batch", "--signal=USR1", job.job_id)
        signalled = time.monotonic()
        state = job.wait(timeout=300)
    finally:
        finish_reference(reference, reference_log)
    finished = time.monotonic()
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), job.describe(state)

    output = job.output()
    assert "USR1 (time limit near or preemption notice)" in output
    assert f"scontrol requeue {job.job_id}" in output
    assert "restart 1: training finished" in output, output[-6000:]
    assert (
        "has not stopped" not in output
    )  # it checkpointed within the stop timeout, not requeued by the deadline

    # The notice stopped the first run at a step boundary in the middle, with a complete checkpoint of both ranks;
    # the rerun resumed from it (not from scratch) and saved the final checkpoint.
    checkpoints = job.output_dir / "checkpoints"
    steps = sorted(int(path.name.removeprefix("step_")) for path in checkpoints.glob("step_*"))
    assert len(steps) == 2 and steps[-1] == STEPS, steps
    stopped_at = steps[0]
    assert 2 <= stopped_at < STEPS
    assert verify(checkpoints / f"step_{stopped_at}") == []
    assert (checkpoints / "latest").read_text().strip() == f"step_{STEPS}"
    marker = json.loads((checkpoints / f"step_{stopped_at}" / "complete.json").read_text())
    assert marker["world_size"] == 2
    assert f"stopped after step {stopped_at}: stop signal" in output + rank_logs(job.output_dir)
    assert f"step_{stopped_at} (step {stopped_at}, 2 ranks)" in output + rank_logs(job.output_dir)

    ours, theirs = train_records(job.output_dir), train_records(tmp_path / "reference")
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    for step in ours:
        for key in EXACT_KEYS:
            assert ours[step][key] == theirs[step][key], f"step {step}: {key}"
        for key in CLOSE_KEYS:
            assert ours[step][key] == pytest.approx(theirs[step][key], rel=1e-6, abs=1e-6), (
                f"step {step}: {key}"
            )
    print(
        f"slurm train: stopped after step {stopped_at}; signal at {signalled - started:.1f}s, "
        f"completed (with the reference) at {finished - started:.1f}s; final loss {ours[STEPS]['loss']:.6f}"
    )


def rank_logs(output_dir: Path) -> str:
    return "\n".join(path.read_text() for path in sorted((output_dir / "logs").glob("*_rank*.log")))
