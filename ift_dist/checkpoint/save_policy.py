"""When the training loop saves a checkpoint and whether it stops after it, decided by all ranks together at every
step boundary: the step and time cadence, stop signals (SIGTERM, SIGUSR1) and the wall-clock deadline.

A stop signal to any rank, or a deadline closer than one more step plus a save, makes every rank save at the next
step boundary and exit with exit_codes.REQUEUE. The ranks agree through one all-reduce of three flags per step.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from ift_dist import dist
from ift_dist.config import CheckpointConfig, ConfigError

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Remembers the stop signals this process received. The handler only records them: a signal that arrives
    during a save (a second one, say) cannot interrupt or corrupt it; the loop looks at the record between steps."""

    def __init__(self) -> None:
        self.received: list[str] = []

    def install(self) -> None:
        for number in STOP_SIGNALS:
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame: object) -> None:
        self.received.append(signal.Signals(number).name)


def resolve_deadline(setting: str | None) -> float | None:
    """checkpoint.deadline as Unix seconds: an ISO time (local unless it has an offset), Unix seconds, "slurm" (the
    job's end time: SLURM_JOB_END_TIME, else `squeue -j $SLURM_JOB_ID -o %e`), or None."""
    if setting is None or not setting.strip():
        return None
    text = setting.strip()
    if text == "slurm":
        return _slurm_end_time()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError as error:
        raise ConfigError(
            f"checkpoint.deadline: {setting!r} is not an ISO time, Unix seconds or 'slurm'"
        ) from error


def _slurm_end_time() -> float | None:
    if value := os.environ.get("SLURM_JOB_END_TIME"):
        return float(value)
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        try:
            output = subprocess.run(
                ["squeue", "-h", "-j", job, "-o", "%e"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
            return datetime.datetime.fromisoformat(output).timestamp()
        except (OSError, subprocess.SubprocessError, ValueError) as error:
            logger.warning("checkpoint.deadline=slurm: no end time from squeue for job %s (%s)", job, error)
            return None
    logger.warning("checkpoint.deadline=slurm: not in a Slurm job (no SLURM_JOB_END_TIME or SLURM_JOB_ID)")
    return None


@dataclass(frozen=True)
class Decision:
    save: bool  # save a checkpoint at this step boundary
    stop: bool  # then stop: exit with exit_codes.REQUEUE
    reason: str  # why, for the log


class SavePolicy:
    """The cadence state (time of the last save, how long saves take) and the stop signals; `decide` once per step
    on every rank. Holds what a running loop learns, hence a class; nothing of it is resumed."""

    def __init__(self, cfg: CheckpointConfig, max_steps: int, signals: StopSignals, deadline: float | None):
        self.cfg = cfg
        self.max_steps = max_steps
        self.signals = signals
        self.deadline = deadline
        self.last_save = time.monotonic()
        self.save_seconds = 0.0  # the longest save so far
        self.reported = False  # the received signals were logged
        if deadline is not None:
            left = deadline - time.time()
            logger.info("deadline in %.0f s: the run saves and stops before it", left)

    def decide(self, step: int, step_seconds: float) -> Decision:
        """Whether to save (and stop) after optimizer step `step`, which took step_seconds; the same on every rank."""
        minutes = (time.monotonic() - self.last_save) / 60
        needed = step_seconds + self.save_seconds + self.cfg.deadline_margin_seconds
        local = [
            float(bool(self.signals.received)),
            float(self.cfg.every_minutes > 0 and minutes >= self.cfg.every_minutes),
            float(self.deadline is not None and time.time() + needed >= self.deadline),
        ]
        if self.signals.received and not self.reported:
            self.reported = True  # other ranks log WARNING and up only: this shows which rank got what
            logger.warning(
                "received %s: saving and stopping after step %d", ", ".join(self.signals.received), step
            )
        signalled, time_due, deadline_near = dist.all_reduce(local, "max")
        periodic = self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0
        if step >= self.max_steps:  # the end of training saves anyway (train.save_at_end)
            return Decision(periodic, False, "every_steps")
        if signalled:
            names = ", ".join(self.signals.received) or "on another rank"
            return Decision(True, True, f"stop signal ({names})")
        if deadline_near:
            return Decision(True, True, "the deadline is near (checkpoint.deadline)")
        if periodic or time_due:
            return Decision(True, False, "every_steps" if periodic else "every_minutes")
        return Decision(False, False, "")

    def saved(self, seconds: float) -> None:
        self.last_save = time.monotonic()
        self.save_seconds = max(self.save_seconds, seconds)
