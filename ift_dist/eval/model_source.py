"""What `ift eval MODEL_OR_RUN` evaluates: a Hugging Face model directory as given, or the checkpoint a run directory
or step_<N> directory names, exported on the fly (as `ift export` does) into a directory removed afterwards."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ift_dist import dist
from ift_dist.checkpoint.run_dir import CHECKPOINTS, RunDir, step_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """The HF directory to load, and where it came from."""

    directory: Path
    checkpoint: Path | None  # the step_<N> directory exported, if one was
    run_config: Path | None  # the run's config.yaml, if MODEL_OR_RUN is a run or a checkpoint of one

    def describe(self) -> str:
        return str(self.checkpoint) if self.checkpoint is not None else str(self.directory)


def is_hf_directory(path: Path) -> bool:
    weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return (path / "config.json").is_file() and weights


def find_checkpoint(path: Path) -> Path | None:
    """The step_<N> directory `path` names: itself, or the `latest` of a run or checkpoints directory."""
    from ift_dist.export import resolve_checkpoint

    if step_of(path) is not None or (path / CHECKPOINTS).is_dir() or (path / "latest").is_file():
        return resolve_checkpoint(path)
    return None


@contextmanager
def model_directory(model_or_run: str, *, dtype: str = "auto") -> Iterator[ModelSource]:
    """Every rank enters it; rank 0 exports a checkpoint once (the others wait at a barrier) into a temporary
    directory beside it that is removed on exit."""
    path = Path(model_or_run)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory, run directory or checkpoint")
    checkpoint = None if is_hf_directory(path) else find_checkpoint(path)
    if checkpoint is None:
        if not is_hf_directory(path):
            raise FileNotFoundError(
                f"{path}: neither a Hugging Face model directory (config.json + weights) nor a run directory or "
                "step_<N> checkpoint"
            )
        yield ModelSource(path, None, None)
        return
    run_config = RunDir(checkpoint.parent.parent).config
    # One directory for all ranks: rank 0 names it.
    made = (
        tempfile.mkdtemp(prefix=f".eval-{checkpoint.name}-", dir=checkpoint.parent.parent)
        if dist.rank() == 0
        else None
    )
    exported = Path(str(dist.broadcast_object(made)))
    try:
        if dist.rank() == 0:
            from ift_dist.export import export_checkpoint
            from ift_dist.export_adapter import is_adapter_checkpoint

            logger.info("exporting %s for evaluation into %s", checkpoint, exported)
            # An adapter run's checkpoint is scored as its base with the adapter merged in.
            export_checkpoint(
                checkpoint, exported / "model", dtype=dtype, merge=is_adapter_checkpoint(checkpoint)
            )
        dist.barrier()
        yield ModelSource(exported / "model", checkpoint, run_config if run_config.is_file() else None)
    finally:
        dist.barrier()
        shutil.rmtree(exported, ignore_errors=True)
