"""Helpers of the checkpoint tests (tests/dist/test_checkpoint_*.py): uninterrupted reference runs launched once per
session and shared between test files, copies of a run cut back to a checkpoint, runs watched while they train (to
signal a rank), and the comparison of per-step metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dist_helpers import HANG_TIMEOUT, REPO, TINY_CONFIG, Run, check, free_port, launch

_REFERENCES: dict[Path, Run] = {}

# Per-step numbers a resumed run must reproduce: the same data (tokens, samples), the same schedule (lr), the same
# numerics (loss, gradient norm).
EXACT_KEYS = ("step", "lr", "tokens", "supervised_tokens", "samples", "rows")
CLOSE_KEYS = ("loss", "grad_norm")


def prepared_overrides(tiny_model: Path, prepared_data: Path) -> list[str]:
    """Runs over prepared (packed) rows, 6 per step, clipping and weight decay that bite, a checkpoint every 2 steps.
    Rank r of W reads rows r, r + W, ...: a step is the same 6 rows on 1, 2 or 3 ranks (after a resume too), so runs
    on different world sizes are comparable step by step."""
    return [
        f"model.name_or_path={tiny_model}",
        f"data.prepared={prepared_data}",
        "train.max_steps=8",
        "train.global_batch_rows=6",
        "train.max_grad_norm=0.5",
        "train.weight_decay=0.1",
        "train.sample_prompts=[]",
        "data.eval_sources=[]",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=0",
    ]


def reference(output_dir: Path, overrides: list[str], *, ranks: int = 2) -> Run:
    """An uninterrupted run, launched the first time a test asks for it in this session."""
    if output_dir not in _REFERENCES:
        _REFERENCES[output_dir] = check(launch(output_dir, overrides, ranks=ranks))
    return _REFERENCES[output_dir]


def cut_back(run: Run, target: Path, step: int) -> Path:
    """A copy of a finished run's directory as if it had stopped right after saving checkpoint step_<step>: that
    checkpoint (and no later one) and `latest` naming it. metrics.jsonl keeps the later records, as a run killed
    after the save would have them."""
    target.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "model_files"):
        source = run.output_dir / name
        if source.is_dir():
            shutil.copytree(source, target / name)
        elif source.exists():
            shutil.copy2(source, target / name)
    checkpoints = target / "checkpoints"
    checkpoints.mkdir()
    for directory in sorted((run.output_dir / "checkpoints").glob("step_*")):
        if int(directory.name.removeprefix("step_")) <= step:
            shutil.copytree(
                directory, checkpoints / directory.name, ignore=shutil.ignore_patterns("universal*")
            )
    (checkpoints / "latest").write_text(f"step_{step}")
    return target


def start(
    output_dir: Path, overrides: list[str], *, ranks: int = 2, env: dict[str, str] | None = None
) -> Any:
    """Like dist_helpers.launch, but returns at once: (process, log path)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
    command += ["--master_port", str(free_port()), "--module", "ift_dist.train", str(TINY_CONFIG)]
    command += [f"output_dir={output_dir}", *overrides]
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    log_path = output_dir.parent / f"{output_dir.name}.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
    )
    log.close()
    return process, log_path


def finish(process: Any, log_path: Path, output_dir: Path, timeout: float = HANG_TIMEOUT) -> Run:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"training hung for {timeout} s; every rank killed. Output:\n{log_path.read_text()}")
    return Run(output_dir, process.returncode, log_path.read_text())


def rank_pid(output_dir: Path, local_rank: int) -> int:
    """The process id of one training rank of the run writing to output_dir (from /proc: the rank's command line)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"ift_dist.train" in arguments
            and f"output_dir={output_dir}".encode() in arguments
            and f"--local_rank={local_rank}".encode() in arguments
        ):
            return int(entry.name)
    raise LookupError(f"no rank {local_rank} of {output_dir} is running")


def wait_for_step(
    output_dir: Path, step: int, process: Any, before: str, timeout: float = HANG_TIMEOUT
) -> None:
    """Until this run has logged optimizer step `step`: metrics.jsonl differs from `before` (its text when the run
    started; a resume first drops the records after its checkpoint) and its last record is that step or later."""
    deadline = time.monotonic() + timeout
    path = output_dir / "metrics.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        text = path.read_text() if path.is_file() else ""
        lines = [line for line in text.splitlines() if line.strip()]
        if text != before and lines and json.loads(lines[-1]).get("step", 0) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step} (exit code {process.poll()})")


def assert_same_steps(run: Run, reference_run: Run, steps: range, *, rtol: float = 1e-6) -> None:
    """The records of `steps` in both runs' metrics.jsonl: the same data and schedule, loss and gradient norm
    within rtol."""
    ours = {record["step"]: record for record in run.train_records()}
    theirs = {record["step"]: record for record in reference_run.train_records()}
    assert sorted(ours) == sorted(theirs), "the metrics list other steps"
    for step in steps:
        for key in EXACT_KEYS:
            assert ours[step][key] == theirs[step][key], f"step {step}: {key}"
        for key in CLOSE_KEYS:
            assert ours[step][key] == pytest.approx(theirs[step][key], rel=rtol), f"step {step}: {key}"


def marker(run_dir: Path, step: int) -> dict[str, Any] | None:
    path = run_dir / "checkpoints" / f"step_{step}" / "complete.json"
    return json.loads(path.read_text()) if path.is_file() else None
