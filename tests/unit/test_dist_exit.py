"""dist.shutdown and dist.exit_process, the training's way out: after a process group, os._exit (no interpreter
teardown) still delivers the exit code and everything written before it; without one, the usual exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ift_dist import dist

PROGRAM = """
import atexit, logging, sys
import torch.distributed
from ift_dist import dist
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
if sys.argv[1] == "group":
    dist.set_single_process_defaults()
    torch.distributed.init_process_group("gloo")  # a world of one: its native threads are alive at exit, too
    torch.distributed.all_reduce(torch.ones(3))
dist.shutdown(together=True)
print("printed, not flushed", end="")  # a pipe: block-buffered until someone flushes
logging.getLogger("x").info("logged")
atexit.register(lambda: print(" atexit ran", end=""))
dist.exit_process(3)
"""


@pytest.mark.parametrize(("mode", "teardown"), [("group", False), ("no-group", True)])
def test_exit_process_delivers_the_code_and_the_output(mode, teardown):
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout == "printed, not flushed" + (" atexit ran" if teardown else "")
    assert result.stderr.strip() == "logged"


def test_shutdown_without_a_process_group_does_nothing():
    assert not dist.is_initialized()
    dist.shutdown(together=True)
    dist.shutdown(together=False)
