"""The Slurm batch script on a real two-node cluster, 2 nodes x 1 rank: the time-limit notice leads to a checkpoint,
a requeue and a resume; a Python error is not requeued; a lost rank is; the restart limit holds; a training that
ignores the notice is requeued at the deadline.

The notice is forced with `scancel --batch --signal=USR1`, which delivers exactly what `--signal=B:USR1@N` delivers
before the time limit (the batch shell gets USR1), without waiting for a time limit whose signal Slurm may send up to
a minute early or late. Each test takes 10-40 s, most of it the ~12 s a requeued job waits before it starts again.
"""

from __future__ import annotations

import os
import signal

import pytest

from ift_dist import exit_codes
from ift_dist.launcher.topology import master_port_for_job

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]

# 2 nodes x 1 CPU rank; the stand-in checkpoints within one step (0.5 s) of the notice.
LAUNCH = ("--nodes=2", "--nproc=1", "--time=10", "--signal-seconds=120", "--stop-timeout=60")


def by(events, kind, restart=None, rank=None):
    return [
        event
        for event in events
        if event["event"] == kind
        and (restart is None or event["restart"] == restart)
        and (rank is None or event["rank"] == rank)
    ]


def test_time_limit_notice_checkpoints_requeues_and_resumes(submit):
    job = submit(*LAUNCH, "--max-restarts=1")
    job.wait_for_event(lambda event: event["event"] == "step" and event["step"] >= 3 and event["rank"] == 1)
    job.cluster.run("scancel", "--batch", "--signal=USR1", job.job_id)
    state = job.wait()
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), job.describe(state)

    events = job.events()
    # The rendezvous of the first run: rank 0 on the job's first node, at the port the job id gives.
    (first,) = by(events, "start", restart=0, rank=0)
    assert first["peers"] == ["0@127.0.0.1", "1@127.0.0.2"]
    assert first["master"] == f"127.0.0.1:{master_port_for_job(job.job_id)}"
    assert sorted(event["node"] for event in by(events, "start", restart=0)) == ["127.0.0.1", "127.0.0.2"]
    assert first["node"] == "127.0.0.1"
    for rank in (0, 1):
        (checkpoint,) = by(events, "checkpoint", restart=0, rank=rank)
        assert checkpoint["signal"] == "SIGUSR1"
        assert 3 <= checkpoint["step"] < 16  # stopped in the middle, at a step boundary
        (resumed,) = by(events, "start", restart=1, rank=rank)
        assert resumed["step"] == checkpoint["step"]  # the requeued job resumed from the checkpoint
        assert [event["step"] for event in by(events, "finished", rank=rank)] == [16]
        assert by(events, "finished", restart=0, rank=rank) == []

    output = job.output()
    assert "USR1 (time limit near or preemption notice)" in output
    assert f"scontrol requeue {job.job_id}" in output
    assert "restart 1: training finished" in output
    assert "standin {'event': 'start', 'rank': 0" in output  # rank 0's log copied into the job output
    logs = sorted(path.name.split("_")[1] for path in (job.output_dir / "logs").glob("*_rank*.log"))
    assert logs == ["rank0.log", "rank0.log", "rank1.log", "rank1.log"]  # per rank, per run


def test_python_error_is_not_requeued(submit):
    job = submit(*LAUNCH, env={"STANDIN_FAIL_RANK": "1", "STANDIN_FAIL_AT_STEP": "2"})
    state = job.wait()
    assert (state["JobState"], state["Restarts"]) == ("FAILED", "0"), job.describe(state)
    assert state["ExitCode"] == f"{exit_codes.FAILED}:0"
    events = job.events()
    assert len(by(events, "error", rank=1)) == 1
    assert [event for event in events if event["restart"] > 0] == []
    # The other node was stopped because of the failure (srun --kill-on-bad-exit); the verdict names the cause.
    assert "node 1 ended with 1 (FAILED: a Python error" in job.output()
    assert "not requeued" in job.output()


def test_lost_rank_is_requeued(submit):
    job = submit(*LAUNCH, "--max-restarts=1")
    victim = job.wait_for_event(
        lambda event: event["event"] == "step" and event["rank"] == 1 and event["step"] >= 2
    )
    os.kill(victim["pid"], signal.SIGKILL)  # as the OOM killer would: no checkpoint, no exit code of its own
    state = job.wait()
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), job.describe(state)
    events = job.events()
    assert by(events, "checkpoint", restart=0, rank=1) == []
    assert len(by(events, "finished", restart=1)) == 2
    assert "node 1 ended with 247 (a rank was killed by SIGKILL)" in job.output()


def test_restart_limit_stops_a_job_that_keeps_asking(submit):
    job = submit(*LAUNCH, "--max-restarts=1", env={"STANDIN_ALWAYS_REQUEUE": "1"})
    state = job.wait()
    assert (state["JobState"], state["Restarts"]) == ("FAILED", "1"), job.describe(state)
    assert state["ExitCode"] == f"{exit_codes.REQUEUE}:0"
    events = job.events()
    assert {(event["restart"], event["rank"]) for event in by(events, "checkpoint")} == {
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    }
    assert "the job has restarted 1 time(s), the maximum" in job.output()


def test_training_that_ignores_the_notice_is_requeued_at_the_deadline(submit):
    """A trainer without a handler (SIGUSR1 stays ignored): the script requeues --stop-timeout seconds after the
    notice anyway, before the time limit could make the job unrequeueable; the rerun starts from scratch."""
    job = submit(*LAUNCH[:-1], "--stop-timeout=4", "--max-restarts=1", env={"STANDIN_IGNORE_STOP": "1"})
    job.wait_for_event(lambda event: event["event"] == "step" and event["step"] >= 2 and event["rank"] == 1)
    job.cluster.run("scancel", "--batch", "--signal=USR1", job.job_id)
    state = job.wait()
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), job.describe(state)
    events = job.events()
    assert by(events, "checkpoint") == [] and by(events, "finished", restart=0) == []
    assert [event["step"] for event in by(events, "start", restart=1)] == [0, 0]
    assert len(by(events, "finished", restart=1)) == 2
    assert "the training has not stopped 4s after the notice: scontrol requeue" in job.output()
