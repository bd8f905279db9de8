"""The exit codes of a training run, shared by the trainer (which exits with them) and the launcher and Slurm batch
script (which decide from them whether to requeue); torch-free, so login nodes can import it.

    code  name                meaning                                                   Slurm script does
    0     OK                  training finished (train.max_steps reached)               ends the job: COMPLETED
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
"""

from __future__ import annotations

import signal

OK = 0
FAILED = 1
CONFIG_ERROR = 2
TOO_MANY_BAD_STEPS = 3
NAN_ABORT = TOO_MANY_BAD_STEPS  # the name used in the launcher issue
REQUEUE = 85

# Failures that a restart cannot fix: the same code and config would fail the same way again.
NOT_REQUEUEABLE = frozenset({FAILED, CONFIG_ERROR, TOO_MANY_BAD_STEPS})

# What the training processes receive, from the launcher, when they must save and stop.
STOP_SIGNAL = signal.SIGUSR1

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
