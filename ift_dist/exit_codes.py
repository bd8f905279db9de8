"""How a training run ended, in the words the trainer and the launcher share: the exit codes (the trainer exits with
them, the launcher and the Slurm batch script decide from them whether to requeue) and the finished record that
outranks them (below); torch-free, so login nodes can import it.

    code  name                meaning                                                   Slurm script does
    0     OK                  training finished (its last step, or early stopping)      ends the job: COMPLETED
    1     FAILED              an uncaught Python exception or another hard error        never requeues
    2     CONFIG_ERROR        the config did not load or validate (argparse too)        never requeues
    3     TOO_MANY_BAD_STEPS  train.max_bad_steps non-finite steps in a row (NaN/inf)   never requeues
    85    REQUEUE             a stop signal arrived; a checkpoint was saved at the      requeues (max restarts)
                              step boundary after it: restart me, I resume from `latest`
    else  (128+N, 256-N)      a rank killed by signal N, a lost node, a launcher error  requeues (max restarts)

Stop signals: SIGUSR1 (Slurm's warning before the time limit, `--signal=B:USR1@...`, or a preemption notice) and
SIGTERM (preemption, `scancel`, a requeue). The launcher hands either one to the training processes as SIGUSR1,
because DeepSpeed's own per-node launcher kills its ranks on SIGTERM but ignores SIGUSR1 when started by us.

85 was picked because nothing else uses it: Python exits 1 on an exception and 2 on a usage error, shells use 126,
127 and 128+N, sysexits.h uses 64-78.

The finished record outranks the exit codes: an exit code is the last thing a process does, and a rank can still
crash in its teardown after the run has finished and saved (a native thread at interpreter exit: SIGABRT, which
DeepSpeed's launcher reports as 250). So the launcher names a file in $IFT_FINISHED_RECORD, and rank 0 writes it as
the very last act of a training that reached its last step (or stopped early) with its final checkpoint committed
(`write_finished_record`). A launcher that finds it (`read_finished_record`) knows the run finished, whatever exit
code follows: the Slurm verdict never requeues it. Without the variable (a plain `deepspeed` command) nothing is
written. The launcher removes an old record before it starts the training, so a record always belongs to this run.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

OK = 0
FAILED = 1
CONFIG_ERROR = 2
TOO_MANY_BAD_STEPS = 3
REQUEUE = 85

# Failures that a restart cannot fix: the same code and config would fail the same way again.
NOT_REQUEUEABLE = frozenset({FAILED, CONFIG_ERROR, TOO_MANY_BAD_STEPS})

# What the training processes receive, from the launcher, when they must save and stop.
STOP_SIGNAL = signal.SIGUSR1

# The file the finished record goes to, named by the launcher for the training processes (see the module docstring).
FINISHED_RECORD_VARIABLE = "IFT_FINISHED_RECORD"

_NAMES = {
    OK: "OK: training finished",
    FAILED: "FAILED: a Python error (see the rank logs)",
    CONFIG_ERROR: "CONFIG_ERROR: the config did not load or validate",
    TOO_MANY_BAD_STEPS: "TOO_MANY_BAD_STEPS: too many non-finite steps in a row",
    REQUEUE: "REQUEUE: checkpointed after a stop signal, restart to resume",
}


def describe(code: int) -> str:
    """A one-line explanation of an exit code, for logs."""
    if code in _NAMES:
        return f"{code} ({_NAMES[code]})"
    if 128 < code <= 128 + 64:
        return f"{code} (killed by {_signal_name(code - 128)})"
    if 192 < code <= 255:
        # DeepSpeed's per-node launcher exits with a rank's negative return code, -N, which the shell sees as 256 - N
        return f"{code} (a rank was killed by {_signal_name(256 - code)})"
    return f"{code} (unexpected failure)"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def is_requeueable(code: int) -> bool:
    """True for REQUEUE and for failures a restart may fix (a lost rank or node); False for success and for errors
    that would repeat (Python error, config error, NaN abort)."""
    return code != OK and code not in NOT_REQUEUEABLE


def write_finished_record(step: int, output_dir: str) -> Path | None:
    """Rank 0, last: the training ended at `step` (its last, or early stopping's) with that checkpoint committed.
    Written to $IFT_FINISHED_RECORD (a temporary file, then a rename: a reader sees all of it or nothing); None
    without it."""
    target = os.environ.get(FINISHED_RECORD_VARIABLE)
    if not target:
        return None
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({"step": step, "output_dir": output_dir}) + "\n")
    temporary.replace(path)
    return path


def read_finished_record(path: Path) -> dict[str, Any] | None:
    """The record `write_finished_record` left at `path`: {"step", "output_dir"}; None if there is none (or it is
    unreadable: then the exit codes decide, as before)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None
