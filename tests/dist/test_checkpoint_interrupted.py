"""Interrupted runs finish as if nothing had happened (real `deepspeed` processes on CPU, gloo, fp32), compared step by
step with one uninterrupted run over prepared rows (checkpoint_runs.prepared_overrides):

- one run lives through a failed save (continues, checkpoint.on_save_error=continue), dies when a rank is killed in
  the middle of the next save, is rerun and stopped by a signal to one rank (a second signal arriving during the
  save it makes), and is rerun to the end: every step's loss, learning rate and token counts equal the
  uninterrupted run's (within 1e-6);
- a checkpoint of 2 ranks resumed on 3 and on 1 rank (DeepSpeed's universal checkpoint, the loaders' states merged
  and re-dealt): again the same steps, so no sample was repeated or skipped.
"""

from __future__ import annotations

import os
import re
import signal

import pytest
from checkpoint_runs import (
    assert_same_steps,
    cut_back,
    finish,
    marker,
    prepared_overrides,
    rank_pid,
    reference,
    start,
    wait_for_step,
)
from dist_helpers import check, launch

from ift_dist.checkpoint import verify
from ift_dist.exit_codes import REQUEUE

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def overrides(tiny_model, prepared_data) -> list[str]:
    return prepared_overrides(tiny_model, prepared_data)


@pytest.fixture(scope="module")
def uninterrupted(dist_dir, overrides):
    return reference(dist_dir / "prepared-reference", overrides)


def latest_step(run_dir) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_"))


def test_crash_failed_save_and_stop_signal_then_the_same_training(dist_dir, uninterrupted, overrides):
    run_dir = dist_dir / "interrupted"
    command = [*overrides, "checkpoint.on_save_error=continue"]

    # 1. The save of step 4 fails on rank 1 (its writes are refused): training goes on. Rank 1 is killed while
    #    saving step 6, after writing its files, before the completion marker.
    process, log = start(run_dir, command, env={"IFT_TEST_FAULT": "disk_full:4:1,sigkill:6:1"})
    crashed = finish(process, log, run_dir)
    assert crashed.returncode not in (0, REQUEUE), crashed.output[-10000:]
    assert "step_4 failed (rank 1: ShardSaveError" in crashed.output
    assert "training goes on (checkpoint.on_save_error=continue)" in crashed.output
    assert latest_step(run_dir) == 2 and verify(run_dir / "checkpoints" / "step_2") == []
    assert not (run_dir / "checkpoints" / "step_4").exists()  # the failed save left nothing behind
    assert marker(run_dir, 6) is None and (run_dir / "checkpoints" / "step_6").is_dir()

    # 2. The same command resumes from step 2 (step 6 has no marker). SIGUSR1 to rank 1 once it trains: all ranks
    #    save at the next step boundary and exit REQUEUE; a SIGTERM reaches rank 1 during that save.
    before = (run_dir / "metrics.jsonl").read_text()
    process, log = start(run_dir, command, env={"IFT_TEST_FAULT": "sigterm:*:1"})
    wait_for_step(run_dir, 3, process, before)
    os.kill(rank_pid(run_dir, local_rank=1), signal.SIGUSR1)
    stopped = finish(process, log, run_dir)
    assert stopped.returncode == REQUEUE, stopped.output[-10000:]
    assert "step_6: no completion marker complete.json (its save did not finish)" in stopped.output
    assert "step_2 (step 2, 2 ranks)" in stopped.output
    assert re.search(
        r"\[rank 1\] WARNING ift_dist.checkpoint.save_policy: received [A-Z, ]*SIGUSR1", stopped.output
    )
    assert "IFT_TEST_FAULT: sigterm in the save of step" in stopped.output
    step = latest_step(run_dir)
    assert 3 <= step < 8 and verify(run_dir / "checkpoints" / f"step_{step}") == []
    assert f"stopped after step {step}: stop signal" in stopped.output

    # 3. The same command again: resumes where the signal stopped it and finishes; every step as uninterrupted.
    finished = check(launch(run_dir, command))
    assert f"step_{step} (step {step}, 2 ranks)" in finished.output
    assert_same_steps(finished, uninterrupted, range(1, 9))


@pytest.mark.parametrize("ranks", [3, 1])
def test_resume_on_another_number_of_ranks_continues_the_same_training(
    dist_dir, uninterrupted, overrides, ranks
):
    run_dir = cut_back(uninterrupted, dist_dir / f"resumed-on-{ranks}", 4)
    run = check(launch(run_dir, [*overrides, "export.at_end=false"], ranks=ranks))
    assert f"the checkpoint was written by 2 ranks, this run has {ranks}: converting" in run.output
    assert (run_dir / "checkpoints" / "step_4" / "universal" / "zero").is_dir()
    assert f"1 rows per micro batch x {ranks} ranks x {6 // ranks} accumulation steps" in run.output
    assert_same_steps(run, uninterrupted, range(1, 9))  # the same rows, loss and gradient norm every step
    assert marker(run_dir, 8)["world_size"] == ranks
