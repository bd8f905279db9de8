"""Saving and restoring one run's checkpoints on every rank: the engine's shards, named per-rank components and the
train progress, written through the commit protocol (ift_dist/checkpoint/protocol.py).

    save       rank 0 clears step_<N>/ | every rank: shards, <name>_rank_<r>.pt, (rank 0) train_state.json and
               model_files/, fsync + sizes + SHA-256 | all-gather: all fine? | rank 0: marker, `latest`, retention
    mark_best  rank 0: `best` names a complete checkpoint (checkpoint.keep_best), then retention
    restore    shards (DeepSpeed's universal version on another world size), each component's state, the counters

The ranks agree after every stage (one all-gather of their errors), so a failure on one rank raises CheckpointError
on all of them at the same point. The engine comes in as a `Shards` adapter (engine.EngineShards): this package
never imports DeepSpeed. docs/checkpoints.md.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from ift_dist import dist
from ift_dist.checkpoint import faults
from ift_dist.checkpoint.collective import agree, gather
from ift_dist.checkpoint.discovery import Resume
from ift_dist.checkpoint.protocol import (
    CheckpointError,
    apply_retention,
    commit,
    describe_files,
    mark_best,
    remove_checkpoint,
)
from ift_dist.checkpoint.run_dir import MODEL_FILES, TRAIN_STATE, UNIVERSAL, RunDir, rank_file
from ift_dist.checkpoint.state import Progress, train_state
from ift_dist.config import Config

logger = logging.getLogger(__name__)


class Shards(Protocol):
    """The engine's part of a checkpoint: files it writes and reads itself, this rank's ZeRO-3 partition."""

    def save(self, directory: Path, tag: str) -> list[Path]:
        """Write this rank's shards into directory/tag (which exists); return the files written."""
        ...

    def load(self, directory: Path, tag: str, *, universal: bool) -> None: ...


class Component(Protocol):
    """A per-rank component: its state is written to <name>_rank_<r>.pt and loaded with weights_only=True."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...

    def load_resharded(self, read: Callable[[int], Any], saved_world_size: int, step: int) -> None:
        """Its state from a checkpoint of saved_world_size ranks (another world size); read(r) = rank r's state."""
        ...


class Checkpointer:
    """The checkpoints of one run: what is saved (the engine's shards, the per-rank `components` by name, the
    `progress`, the `shared` components, the same on every rank, in train_state.json with the run's `steps`), where
    (`run`) and how (checkpoint.checksums, keep_last, keep_every, keep_best). Every rank holds one and calls `save`
    at the same step boundary; `restore` once, before the first step."""

    def __init__(
        self,
        run: RunDir,
        cfg: Config,
        *,
        shards: Shards,
        progress: Progress,
        components: dict[str, Component],
        shared: dict[str, Any] | None = None,
        steps: dict[str, Any] | None = None,
    ):
        self.run = run
        self.cfg = cfg
        self.shards = shards
        self.progress = progress
        self.components = components
        self.shared = shared or {}
        self.steps = steps

    def save(self, *, epoch: int) -> Path:
        """Save checkpoints/step_<N> of the current step. Raises CheckpointError on every rank if any rank failed;
        the unfinished directory is then removed, every other checkpoint is left as it was."""
        settings = self.cfg.checkpoint
        shared = {name: component.state_dict() for name, component in self.shared.items()}
        state = train_state(self.progress, self.cfg, epoch=epoch, steps=self.steps, shared=shared)
        # Taken before any collective of the save, so the generators are recorded as the loop left them.
        component_states = {name: component.state_dict() for name, component in self.components.items()}
        rank, step = dist.rank(), self.progress.step
        directory = self.run.step(step)
        error = None
        if rank == 0:
            try:  # leftovers of an unfinished save of this step (a crash, then a resume from an older checkpoint)
                remove_checkpoint(directory)
                directory.mkdir(parents=True)
            except OSError as failure:
                error = f"cannot create {directory}: {failure}"
        _raise_if_failed(agree(error), directory)

        entries: dict[str, dict[str, Any]] = {}
        error = None
        try:
            with faults.disk_full(step, rank):
                written = self.shards.save(directory.parent, directory.name)
            for name, value in component_states.items():
                path = rank_file(directory, name, rank)
                torch.save(value, path)
                written.append(path)
            if rank == 0:
                (directory / TRAIN_STATE).write_text(json.dumps(state, indent=1, default=str) + "\n")
                written.append(directory / TRAIN_STATE)
                shutil.copytree(self.run.model_files, directory / MODEL_FILES)
                written += sorted(path for path in (directory / MODEL_FILES).rglob("*") if path.is_file())
            entries = describe_files(directory, written, settings.checksums)
            faults.signal_self("sigterm", step, rank)
            faults.signal_self("sigkill", step, rank)
        except (OSError, RuntimeError) as failure:
            error = f"{type(failure).__name__}: {failure}"
        _raise_if_failed(agree(error), directory)

        error = None
        files = {name: entry for part in gather(entries) for name, entry in part.items()}
        if rank == 0:
            try:
                commit(directory, files, state, settings.checksums)
            except OSError as failure:
                error = f"{type(failure).__name__}: {failure}"
        _raise_if_failed(agree(error), directory)
        if rank == 0:
            self._apply_retention()
        return directory

    def mark_best(self, step: int) -> Path | None:
        """Rank 0 (others return at once): `best` names checkpoints/step_<step>, which must be complete; then the
        retention, which keeps it. Returns its path, or None (with a warning) when there is no such checkpoint."""
        if dist.rank() != 0:
            return None
        directory = self.run.step(step)
        try:
            mark_best(directory)
        except OSError as failure:
            logger.warning("checkpoint.keep_best: cannot name %s the best checkpoint: %s", directory, failure)
            return None
        self._apply_retention()
        return directory

    def _apply_retention(self) -> None:
        settings = self.cfg.checkpoint
        try:
            apply_retention(
                self.run.checkpoints,
                keep_last=settings.keep_last,
                keep_every=settings.keep_every,
                keep_best=settings.keep_best,
            )
        except OSError as failure:  # the new checkpoint is complete: a failed deletion does not undo it
            logger.warning("retention: could not delete an old checkpoint: %s", failure)

    def restore(self, found: Resume) -> None:
        """Load the shards (weights, optimizer states), every component and the counters from `found`.
        Same world size: each rank takes its own files. Another world size: the universal checkpoint
        (universal.prepare made it) and each component's `load_resharded`."""
        rank = dist.rank()
        if found.world_size == dist.world_size():
            self.shards.load(found.path.parent, found.path.name, universal=False)
            for name, component in self.components.items():
                component.load_state_dict(_torch_load(rank_file(found.path, name, rank)))
        else:
            self.shards.load(found.path, UNIVERSAL, universal=True)
            for name, component in self.components.items():

                def read(old_rank: int, name: str = name) -> Any:
                    return _torch_load(rank_file(found.path, name, old_rank))

                component.load_resharded(read, found.world_size, found.step)
        self.progress.load_state_dict(found.state)
        for name, component in self.shared.items():
            if name in found.state:  # absent from checkpoints of runs without it
                component.load_state_dict(found.state[name])


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _raise_if_failed(errors: list[str], directory: Path) -> None:
    if not errors:
        return
    if dist.rank() == 0:
        try:
            remove_checkpoint(directory)
        except OSError as failure:
            logger.warning("could not remove the failed checkpoint %s: %s", directory, failure)
    dist.barrier()
    raise CheckpointError(
        f"saving checkpoint {directory} failed ({'; '.join(errors)}); the previous checkpoints are untouched"
    )
