"""Runs DeepSpeed's launcher as a child process and stands between it and the signals: a stop signal (SIGUSR1 or
SIGTERM) reaches the training processes as SIGUSR1, the child's exit code comes back (with whether the training
left its finished record), and one rank's log file is copied to our stdout while it grows.

Why SIGUSR1 and not the signal itself: DeepSpeed's per-node launcher (deepspeed.launcher.launch) answers SIGTERM
and SIGINT by killing its ranks (SIGTERM, then SIGKILL after 30 s), and SIGUSR1's default action would kill it. The
child is therefore started with SIGUSR1 ignored (an ignored signal stays ignored across exec, so DeepSpeed's runner
and launcher ignore it too) and the ranks, which install their own handler, are the only ones that act on it:
save a checkpoint at the next step boundary, exit with exit_codes.REQUEUE. A second SIGTERM is a hard stop: SIGTERM
to every process of the run. Ctrl-C reaches every process of the terminal's group by itself and is not forwarded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ift_dist import exit_codes

logger = logging.getLogger(__name__)

# How long a failed training's launcher looks for the finished record: rank 0 may have written it on another machine.
FINISHED_RECORD_PATIENCE_SECONDS = 5.0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), from /proc; [] where /proc is missing."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # /proc/PID/stat: "pid (comm) state ppid ...", where comm may itself contain spaces and parentheses
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def signal_tree(pid: int, signum: int) -> None:
    """Send `signum` to `pid` and all its descendants (the launcher, its ranks and anything they started)."""
    for target in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signum)


def _child_signals() -> None:
    """In the child, before exec: the stop signal ignored (inherited through exec), Ctrl-C back to its default."""
    signal.signal(exit_codes.STOP_SIGNAL, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _LogFollower(threading.Thread):
    """Copies the newest `*_rank{rank}.log` that DeepSpeed writes under `log_dir` (created after `since`) to our
    stdout, so the console (or the Slurm output file) shows rank 0 while every rank keeps its own file."""

    def __init__(self, log_dir: Path, rank: int, since: float) -> None:
        super().__init__(daemon=True, name="follow-rank-log")
        self.log_dir, self.pattern, self.since = log_dir, f"*_rank{rank}.log", since
        self.stopped = threading.Event()

    def _current(self) -> Path | None:
        newest, newest_time = None, self.since - 1
        for path in self.log_dir.glob(self.pattern):
            with contextlib.suppress(OSError):  # a file removed meanwhile
                if path.stat().st_mtime >= newest_time:
                    newest, newest_time = path, path.stat().st_mtime
        return newest

    def run(self) -> None:
        path, offset = None, 0
        while True:
            # Read the flag before the last copy, so nothing written before the stop is lost.
            stopping = self.stopped.is_set()
            path = path or self._current()
            if path is not None:
                with path.open("rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
                offset += len(chunk)
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            if stopping:
                return
            self.stopped.wait(0.5)


@dataclass(frozen=True)
class Outcome:
    """How the training ended: its exit code (128 + N when killed by signal N), whether a stop signal had reached
    us before (then a non-zero code may be the consequence of that signal, not a failure of its own), and whether
    rank 0 left the finished record (exit_codes.write_finished_record): the run reached train.max_steps and
    committed its final checkpoint, so a non-zero code can only come from a rank's teardown."""

    code: int
    stopped: bool
    finished: bool = False


def run_training(
    command: list[str],
    environ: Mapping[str, str],
    *,
    follow_log_dir: Path | None = None,
    follow_rank: int = 0,
    finished_record: Path | None = None,
) -> Outcome:
    """Run `command` (DeepSpeed's runner) with the stop-signal handling described above. With `finished_record`, the
    training is told to write its finished record there ($IFT_FINISHED_RECORD); an older one is removed first, so
    the one found afterwards is this run's."""
    started = time.time()
    if finished_record is not None:
        finished_record.unlink(missing_ok=True)
        environ = {**environ, exit_codes.FINISHED_RECORD_VARIABLE: str(finished_record)}
    child: subprocess.Popen | None = None
    stops, terms = 0, 0

    def on_stop(signum: int, _frame: object) -> None:
        nonlocal stops, terms
        stops += 1
        terms += signum == signal.SIGTERM
        if child is None:
            return  # arrived while starting: passed on right after the start, below
        name = signal.Signals(signum).name
        if terms > 1:
            logger.warning("%s again: stopping the training processes now (SIGTERM)", name)
            signal_tree(child.pid, signal.SIGTERM)
        else:
            logger.warning("%s: asking the training processes to checkpoint and stop (SIGUSR1)", name)
            signal_tree(child.pid, exit_codes.STOP_SIGNAL)

    # Handlers first, so that no stop signal can kill this process between the start and the handlers.
    previous = {signum: signal.signal(signum, on_stop) for signum in (signal.SIGUSR1, signal.SIGTERM)}
    # Ctrl-C: the terminal signals every process of the group, the children included; we wait for their exit code.
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    follower = None
    try:
        child = subprocess.Popen(command, env=dict(environ), preexec_fn=_child_signals)
        if stops:
            signal_tree(child.pid, exit_codes.STOP_SIGNAL)
        if follow_log_dir is not None:
            follower = _LogFollower(follow_log_dir, follow_rank, started)
            follower.start()
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if follower is not None:
            follower.stopped.set()
            follower.join(timeout=5)
    code = 128 - code if code < 0 else code
    logger.info("training exited with %s", exit_codes.describe(code))
    # Only a failure needs a second look.
    patience = 0.0 if code in (exit_codes.OK, exit_codes.REQUEUE) else FINISHED_RECORD_PATIENCE_SECONDS
    finished = finished_record is not None and _finished(finished_record, wait_seconds=patience)
    if finished and code != exit_codes.OK:
        logger.warning(
            "the training had finished and committed its final checkpoint (%s) before it exited with %s: a crash "
            "at teardown; the run counts as finished",
            finished_record,
            exit_codes.describe(code),
        )
    return Outcome(code, stopped=stops > 0, finished=finished)


def _finished(record: Path, wait_seconds: float) -> bool:
    """Whether the finished record is there. Rank 0 may run on another machine: on a network file system a file it
    has just written can take a moment to appear, so a failed run waits a little before it is judged unfinished."""
    deadline = time.monotonic() + wait_seconds
    while exit_codes.read_finished_record(record) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True
