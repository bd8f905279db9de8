"""The universal version of a checkpoint (step_<N>/universal/), made once by rank 0 when a run resumes on another
number of ranks, while the other ranks wait for it. docs/checkpoints.md, *Another number of ranks*."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ift_dist import dist
from ift_dist.checkpoint.discovery import Resume
from ift_dist.checkpoint.protocol import CheckpointError
from ift_dist.checkpoint.run_dir import UNIVERSAL

logger = logging.getLogger(__name__)

# (checkpoint directory, output directory, log file) -> None; raises on failure. engine.convert_to_universal: passed
# in, so that this package never imports DeepSpeed.
Converter = Callable[[Path, Path, Path], None]


def prepare(resume: Resume, convert: Converter) -> None:
    """Rank 0 converts the checkpoint's ZeRO-3 shards into DeepSpeed's universal format (step_<N>/universal, once:
    a finished conversion is kept) while the others wait for it on the filesystem, not in a collective: a big
    model's conversion can outlast the process group's timeout."""
    target, failed = resume.path / UNIVERSAL, resume.path / f"{UNIVERSAL}.error"
    needed = not target.is_dir()
    if dist.rank() == 0 and needed:
        failed.unlink(missing_ok=True)  # of an earlier attempt
    dist.barrier()
    if dist.rank() == 0 and needed:
        logger.info(
            "the checkpoint was written by %d ranks, this run has %d: converting %s to a universal checkpoint",
            resume.world_size,
            dist.world_size(),
            resume.path,
        )
        started = time.perf_counter()
        partial = resume.path / f"{UNIVERSAL}.partial"
        try:
            shutil.rmtree(partial, ignore_errors=True)
            convert(resume.path, partial, resume.path / f"{UNIVERSAL}.log")
            os.replace(partial, target)  # a conversion cut short is never taken for a finished one
            logger.info("converted in %.1f s", time.perf_counter() - started)
        except (OSError, RuntimeError) as failure:
            failed.write_text(str(failure))
    while not (target.is_dir() or failed.is_file()):
        time.sleep(1.0)
    if failed.is_file():
        raise CheckpointError(f"no universal checkpoint of {resume.path}: {failed.read_text()}")
