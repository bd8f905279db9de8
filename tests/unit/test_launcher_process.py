"""launcher.process with real processes: a stop signal reaches the ranks as SIGUSR1 while the launcher in between
(DeepSpeed's, here a stand-in that installs no handler) survives it; a second SIGTERM stops everything."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ift_dist.launcher.process import descendants

pytestmark = pytest.mark.timeout(60)

# What DeepSpeed's launcher does, reduced: start one rank, wait for it, exit with its code; no signal handlers.
LAUNCHER = """
import signal, subprocess, sys
print("launcher ignores USR1:", signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN, flush=True)
print("launcher ignores Ctrl-C:", signal.getsignal(signal.SIGINT) == signal.SIG_IGN, flush=True)
sys.exit(subprocess.call([sys.executable, "-c", sys.argv[1], *sys.argv[2:]]))
"""
# A rank: says it is ready, then waits; with a handler, SIGUSR1 means "checkpoint and exit 85".
RANK = """
import pathlib, signal, sys, time
directory = pathlib.Path(sys.argv[1])
if sys.argv[2] == "handler":
    signal.signal(signal.SIGUSR1, lambda *_: (directory.joinpath("checkpoint").write_text("ok"), sys.exit(85)))
directory.joinpath("ready").write_text("ok")
time.sleep(60)
"""
DRIVER = """
import os, sys
from ift_dist.launcher.process import run_training
outcome = run_training(sys.argv[1:], os.environ)
print("outcome", outcome.code, outcome.stopped, flush=True)
sys.exit(outcome.code)
"""


def start(tmp_path: Path, mode: str) -> subprocess.Popen:
    command = [sys.executable, "-c", DRIVER, sys.executable, "-c", LAUNCHER, RANK, str(tmp_path), mode]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()[0]
        time.sleep(0.05)
    return process


@pytest.mark.parametrize("stop", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_stop_signal_reaches_the_rank_as_sigusr1(tmp_path, stop):
    process = start(tmp_path, "handler")
    assert len(descendants(process.pid)) == 2  # the launcher and its rank
    process.send_signal(stop)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 85, output
    assert (tmp_path / "checkpoint").read_text() == "ok"
    assert "launcher ignores USR1: True" in output and "outcome 85 True" in output
    assert (
        "launcher ignores Ctrl-C: False" in output
    )  # the parent ignores it while waiting, the children must not


def test_second_sigterm_stops_a_rank_that_does_not_checkpoint(tmp_path):
    process = start(
        tmp_path, "no-handler"
    )  # the rank inherited SIGUSR1 ignored and never installed a handler
    process.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert process.poll() is None  # USR1 was ignored all the way down: nothing stopped yet
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert not (tmp_path / "checkpoint").exists()
