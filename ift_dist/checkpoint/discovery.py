"""Which checkpoint a run resumes from: the newest complete one of the run directory or the one a path names,
every rank agreeing, each newer damaged or unfinished checkpoint named in a warning. docs/checkpoints.md."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ift_dist import dist
from ift_dist.checkpoint.collective import gather
from ift_dist.checkpoint.protocol import CheckpointError, verify
from ift_dist.checkpoint.run_dir import LATEST, TRAIN_STATE, RunDir, locate, step_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resume:
    """A complete checkpoint to resume from."""

    path: Path
    state: dict[str, Any]  # its train_state.json

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def world_size(self) -> int:
        return int(self.state["world_size"])


def find_resume(setting: str, output_dir: Path, *, checksums: bool = True) -> Resume | None:
    """The checkpoint to resume from (every rank, same answer): checkpoint.resume = "auto" (the newest complete one
    of output_dir/checkpoints, None if there is none), "never" (None) or a path (a step_<N>, checkpoints or run
    directory, run_dir.locate, whose checkpoint must be complete). Damaged or unfinished checkpoints are skipped with
    a warning."""
    if setting == "never":
        return None
    explicit = setting != "auto"
    checkpoints, step_dir = locate(Path(setting)) if explicit else (RunDir(output_dir).checkpoints, None)
    # Rank 0 lists and the others take its list: every rank then looks at the same candidates.
    if step_dir is not None:
        listed = [step_dir]
    elif checkpoints.is_dir():
        steps = [path for path in checkpoints.iterdir() if path.is_dir() and step_of(path) is not None]
        listed = sorted(steps, key=step_of, reverse=True)
    else:
        listed = []
    candidates = gather(listed)[0]
    rank, world_size = dist.rank(), dist.world_size()
    for candidate in candidates:
        mine = verify(candidate, checksums=checksums, rank=rank, world_size=world_size)
        problems = sorted({problem for part in gather(mine) for problem in part})
        if not problems:
            state = json.loads((candidate / TRAIN_STATE).read_text())
            logger.info("resuming from %s (step %d, %d ranks)", candidate, state["step"], state["world_size"])
            return Resume(candidate, state)
        if rank == 0:
            logger.warning("skipping checkpoint %s: %s", candidate, "; ".join(problems))
    if explicit:
        raise CheckpointError(
            f"checkpoint.resume={setting}: no complete checkpoint there (see the warnings above)"
        )
    return None


def latest_checkpoint(path: Path) -> Path:
    """The checkpoint a path names for `ift export` (run_dir.locate): a step_<N> directory as given, else the one
    `latest` names in its checkpoints directory."""
    checkpoints, step_dir = locate(path)
    if step_dir is not None:
        return step_dir
    if not (checkpoints / LATEST).is_file():
        raise FileNotFoundError(
            f"{path}: neither a step_<N> checkpoint nor a directory with checkpoints/{LATEST}"
        )
    return checkpoints / (checkpoints / LATEST).read_text().strip()
