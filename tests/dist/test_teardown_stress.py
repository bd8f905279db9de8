"""Short 2-rank runs of the real `deepspeed` command, one after another: every one must exit 0. A finished run once
exited 250 (a rank aborted with "terminate called without an active exception" while the interpreter tore down the
process group's native threads, after the final checkpoint); train.py now leaves through dist.exit_process. CI runs
2 to stay within its time; raise IFT_STRESS_RUNS after touching the exit path.

    IFT_STRESS_RUNS=30 .venv/bin/python -m pytest tests/dist/test_teardown_stress.py    (default: 2 runs, ~50 s)
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from dist_helpers import launch

from ift_dist import exit_codes

RUNS = int(os.environ.get("IFT_STRESS_RUNS", "2"))

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(max(600, 120 * RUNS))]


def test_every_short_two_rank_run_exits_zero(dist_dir, tiny_model, monkeypatch):
    overrides = [
        f"model.name_or_path={tiny_model}",
        "train.max_steps=1",
        "train.global_batch_rows=2",  # one micro batch per rank, no accumulation: the shortest real step
        "train.eval_every=0",
        "data.eval_sources=[]",
        "train.sample_prompts=[]",
    ]  # the final checkpoint and the export stay: the crash came after them
    codes, failures = Counter(), []
    for index in range(RUNS):
        output_dir = dist_dir / "stress" / f"run{index}"
        record = output_dir / "finished"
        monkeypatch.setenv(
            exit_codes.FINISHED_RECORD_VARIABLE, str(record)
        )  # as the Slurm node launcher does
        run = launch(output_dir, overrides)
        codes[run.returncode] += 1
        finished = exit_codes.read_finished_record(record)
        if run.returncode != 0 or finished != {"step": 1, "output_dir": str(output_dir)}:
            failures.append(
                f"run {index}: exit code {run.returncode}, finished record {finished}:\n{run.output[-3000:]}"
            )
    print(f"{RUNS} runs, exit codes: {dict(codes)}")
    assert not failures, f"{len(failures)} of {RUNS} runs failed (exit codes {dict(codes)}):\n" + "\n".join(
        failures
    )
