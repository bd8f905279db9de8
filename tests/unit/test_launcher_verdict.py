"""The batch script's decision after its job step (launcher.verdict), the exit codes it is made from, and the
finished record that outranks them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from ift_dist import exit_codes
from ift_dist.launcher import process
from ift_dist.launcher.process import run_training
from ift_dist.launcher.verdict import NodeStatus, decide, read_statuses, write_status

OK, FAILED, REQUEUE = exit_codes.OK, exit_codes.FAILED, exit_codes.REQUEUE
ABORTED_RANK = 256 - signal.SIGABRT  # DeepSpeed's launcher: a rank ended by SIGABRT ("terminate called ...")
ABORTED = 128 + signal.SIGABRT  # the process itself ended by SIGABRT


def status(code, stopped=False, finished=False):
    return NodeStatus(code, stopped, finished)


@pytest.mark.parametrize(
    ("srun_code", "statuses", "flags", "action", "code"),
    [
        # finished
        (0, {0: status(0), 1: status(0)}, {}, "done", OK),
        # the notice: both nodes checkpointed; they report 0 to srun so it kills nobody mid-save
        (0, {0: status(REQUEUE, True), 1: status(REQUEUE, True)}, {"notice": True}, "requeue", REQUEUE),
        # a Python error on node 1; node 0 was stopped because of it and checkpointed: not requeued
        (143, {0: status(REQUEUE, True), 1: status(FAILED)}, {}, "fail", FAILED),
        (
            143,
            {0: status(143, True), 1: status(exit_codes.CONFIG_ERROR)},
            {},
            "fail",
            exit_codes.CONFIG_ERROR,
        ),
        (143, {0: status(exit_codes.TOO_MANY_BAD_STEPS), 1: status(143, True)}, {}, "fail", 3),
        # a rank killed by the OOM killer (DeepSpeed's launcher reports 256 - 9)
        (143, {0: status(REQUEUE, True), 1: status(247)}, {}, "requeue", REQUEUE),
        # a node lost: no status; the survivor's collective failed with a Python error
        (143, {0: status(FAILED), 1: None}, {}, "requeue", REQUEUE),
        # preemption that SIGTERMs the tasks but not the batch shell: the training checkpointed
        (0, {0: status(REQUEUE, True), 1: status(REQUEUE, True)}, {}, "requeue", REQUEUE),
        # the training asked for a requeue by itself
        (0, {0: status(REQUEUE), 1: status(REQUEUE)}, {}, "requeue", REQUEUE),
        # SIGTERM to the batch script (scancel, preemption, time limit): Slurm decides
        (143, {0: status(143, True), 1: status(143, True)}, {"terminated": True}, "stop", 143),
        (0, {0: status(REQUEUE, True), 1: status(REQUEUE, True)}, {"terminated": True}, "stop", REQUEUE),
        # the notice, and the training did not survive it: still requeue (bounded by the restart limit)
        (1, {0: status(FAILED, True), 1: status(FAILED, True)}, {"notice": True}, "requeue", REQUEUE),
        # srun itself failed (no task started, no status): requeue
        (1, {0: None, 1: None}, {}, "requeue", REQUEUE),
        # stopped nodes only, and none checkpointed: nothing to resume from a signal we did not see
        (143, {0: status(143, True), 1: status(143, True)}, {}, "fail", 143),
    ],
)
def test_decide(srun_code, statuses, flags, action, code):
    verdict = decide(
        srun_code, statuses, restart=0, max_restarts=3, **{"notice": False, "terminated": False, **flags}
    )
    assert (verdict.action, verdict.code) == (action, code), verdict.reason


@pytest.mark.parametrize(
    ("srun_code", "statuses", "flags"),
    [
        # a rank aborted at interpreter exit after the final checkpoint (DeepSpeed reports 250)
        (ABORTED_RANK, {0: status(ABORTED_RANK, finished=True)}, {}),
        (ABORTED, {0: status(ABORTED, finished=True)}, {}),
        # two nodes: node 1 did not see the record (a network file system is slow), node 0 did
        (ABORTED_RANK, {0: status(OK, finished=True), 1: status(ABORTED_RANK)}, {}),
        (ABORTED_RANK, {0: status(ABORTED_RANK, finished=True), 1: status(ABORTED_RANK, finished=True)}, {}),
        # node 1's launcher lost after the run finished
        (143, {0: status(OK, finished=True), 1: None}, {}),
        # a signal that came too late to matter
        (0, {0: status(OK, True, finished=True)}, {"notice": True}),
        (ABORTED_RANK, {0: status(ABORTED_RANK, True, finished=True)}, {"terminated": True}),
    ],
)
def test_a_finished_run_is_done_whatever_the_exit_codes(srun_code, statuses, flags):
    verdict = decide(
        srun_code, statuses, restart=5, max_restarts=3, **{"notice": False, "terminated": False, **flags}
    )
    assert (verdict.action, verdict.code) == ("done", OK), verdict.reason
    assert verdict.reason.startswith("training finished")


@pytest.mark.parametrize("code", [ABORTED_RANK, ABORTED])
def test_an_unfinished_run_whose_rank_aborted_is_requeued(code):
    verdict = decide(code, {0: status(code)}, notice=False, terminated=False, restart=0, max_restarts=3)
    assert (verdict.action, verdict.code) == ("requeue", REQUEUE), verdict.reason
    assert "SIGABRT" in verdict.reason


# A training that finishes (rank 0 leaves its finished record) and then aborts in its teardown, or aborts unfinished.
TRAINING = """
import os, sys
from ift_dist import exit_codes
if sys.argv[1] == "finished":
    exit_codes.write_finished_record(12, "runs/x")
os.abort()
"""


@pytest.mark.parametrize("finishes", [True, False], ids=["finished", "unfinished"])
def test_run_training_reports_the_finished_record(tmp_path, monkeypatch, finishes):
    monkeypatch.setattr(process, "FINISHED_RECORD_PATIENCE_SECONDS", 0.5)
    record = tmp_path / "status" / "finished"
    record.parent.mkdir()
    record.write_text('{"step": 3, "output_dir": "an older run"}\n')  # removed before the training starts
    command = [sys.executable, "-c", TRAINING, "finished" if finishes else "crashes"]
    outcome = run_training(command, os.environ, finished_record=record)
    assert (outcome.code, outcome.stopped, outcome.finished) == (ABORTED, False, finishes)
    if finishes:
        assert exit_codes.read_finished_record(record) == {"step": 12, "output_dir": "runs/x"}
    else:
        assert not record.exists()


def test_finished_record_without_a_launcher_is_not_written(tmp_path, monkeypatch):
    monkeypatch.delenv(exit_codes.FINISHED_RECORD_VARIABLE, raising=False)
    assert exit_codes.write_finished_record(4, str(tmp_path)) is None
    assert exit_codes.read_finished_record(tmp_path / "finished") is None
    (tmp_path / "finished").write_text("{not json")
    assert exit_codes.read_finished_record(tmp_path / "finished") is None


def test_restart_limit_turns_a_requeue_into_a_failure():
    statuses = {0: status(REQUEUE, True)}
    assert decide(0, statuses, notice=True, terminated=False, restart=2, max_restarts=3).action == "requeue"
    verdict = decide(0, statuses, notice=True, terminated=False, restart=3, max_restarts=3)
    assert (verdict.action, verdict.code) == ("fail", REQUEUE)
    assert "the maximum" in verdict.reason
    assert decide(0, statuses, notice=True, terminated=False, restart=0, max_restarts=0).action == "fail"


def test_statuses_round_trip_and_missing_files(tmp_path):
    write_status(tmp_path, 0, REQUEUE, True)
    write_status(tmp_path, 2, 247, False)
    (tmp_path / "node3").write_text("garbage\n")
    write_status(tmp_path, 4, ABORTED_RANK, False, finished=True)
    (tmp_path / "node5").write_text("0 0\n")  # written before the finished record existed
    statuses = read_statuses(tmp_path, 6, wait_seconds=0)
    assert statuses == {
        0: status(REQUEUE, True),
        1: None,
        2: status(247),
        3: None,
        4: status(ABORTED_RANK, finished=True),
        5: status(OK),
    }
    assert not list(tmp_path.glob("*.tmp"))


def test_command_line_prints_one_line(tmp_path):
    write_status(tmp_path, 0, FAILED, False)
    write_status(tmp_path, 1, 143, True)
    command = [
        sys.executable,
        "-m",
        "ift_dist.launcher.verdict",
        "--status-dir",
        str(tmp_path),
        "--nodes",
        "2",
    ]
    command += ["--srun-code", "143", "--restart", "0", "--max-restarts", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    action, code, reason = result.stdout.strip().split(" ", 2)
    assert (action, code) == ("fail", "1")
    assert reason.startswith("node 0 ended with 1 (FAILED")


def test_exit_codes():
    assert exit_codes.REQUEUE not in (0, 1, 2, 126, 127) and not 64 <= exit_codes.REQUEUE <= 78
    assert [exit_codes.is_requeueable(code) for code in (0, 1, 2, 3, 85, 137, 247)] == [
        False,
        False,
        False,
        False,
        True,
        True,
        True,
    ]
    assert exit_codes.describe(137) == "137 (killed by SIGKILL)"
    assert exit_codes.describe(247) == "247 (a rank was killed by SIGKILL)"
    assert "REQUEUE" in exit_codes.describe(85)
    assert exit_codes.STOP_SIGNAL.name == "SIGUSR1"
