"""Test-only fault injection into a checkpoint save, at the process edge, driven by IFT_TEST_FAULT.

IFT_TEST_FAULT=KIND:STEP:RANK[,...] (STEP or RANK may be *) makes the save of that step fail on that rank, for the
fault tests (tests/dist/test_checkpoint_interrupted.py). Never set it otherwise.
  disk_full  the OS refuses the rank's DeepSpeed shard writes (file size limit), as on a full disk
  sigterm    the rank signals itself SIGTERM after writing its files: a second stop signal during a save
  sigkill    the rank kills itself after writing its files, before the marker: a crash in the middle of a save
"""

from __future__ import annotations

import logging
import os
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

FAULT_VARIABLE = "IFT_TEST_FAULT"


def _fault_wanted(kind: str, step: int, rank: int) -> bool:
    for item in filter(None, os.environ.get(FAULT_VARIABLE, "").split(",")):
        name, fault_step, fault_rank = item.split(":")
        if name == kind and fault_step in ("*", str(step)) and fault_rank in ("*", str(rank)):
            return True
    return False


@contextmanager
def disk_full(step: int, rank: int) -> Iterator[None]:
    """Around the shard writes: if asked for, writes over 64 kB fail with EFBIG, as on a full disk."""
    if not _fault_wanted("disk_full", step, rank):
        yield
        return
    logger.warning("%s: writes over 64 kB fail during this save", FAULT_VARIABLE)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)


def signal_self(kind: str, step: int, rank: int) -> None:
    """After the rank's files are written: SIGTERM ("sigterm") or SIGKILL ("sigkill") to itself, if asked for."""
    if _fault_wanted(kind, step, rank):
        logger.warning("%s: %s in the save of step %d", FAULT_VARIABLE, kind, step)
        os.kill(os.getpid(), signal.SIGKILL if kind == "sigkill" else signal.SIGTERM)
