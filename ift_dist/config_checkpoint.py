"""The `checkpoint` and `export` sections of the run configuration (ift_dist/config.py holds the rest and loads them
all): when checkpoints are saved and kept, how a run resumes, and the Hugging Face export. docs/checkpoints.md."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    """When checkpoints are saved and kept, and how a run resumes (docs/checkpoints.md). A checkpoint is
    <output_dir>/checkpoints/step_<N>/; train.save_at_end saves one when training ends."""

    # Save every N optimizer steps (0 = not by step count).
    every_steps: int = 0
    # Save when this many minutes have passed since the last save (or the start); 0 = not by time. Checked at every
    # step boundary; the ranks agree (the largest elapsed time counts).
    every_minutes: float = 30.0
    # Keep the newest K complete checkpoints (0 = keep all). Older ones are deleted after a save completes.
    keep_last: int = 2
    # Also keep every checkpoint whose step is a multiple of J, whatever keep_last says (0 = none).
    keep_every: int = 0
    # "auto": resume from the newest complete checkpoint of <output_dir>/checkpoints, if any (a checkpoint without
    # its completion marker, or with a file missing, truncated or corrupted, is skipped with a warning); "never":
    # start from the pretrained model even if checkpoints exist; or a path: a step_<N> directory, a checkpoints
    # directory or a run directory (its newest complete checkpoint), which must exist and be complete.
    resume: str = "auto"
    # Resume although keys that change the run (model, data, sequence length, seed, optimisation) differ from the
    # checkpoint's config. Without it such a resume is refused with the list of keys.
    force_resume: bool = False
    # Record the SHA-256 of every file in the completion marker and check it on resume (a corrupted shard is found
    # and skipped); false = sizes only (faster for very large checkpoints on slow disks).
    checksums: bool = True
    # A save that fails (disk full, permission denied, on any rank): "stop" the run (exit code 1) or "continue"
    # training, with an error in the log. The previous checkpoint is never touched either way.
    on_save_error: str = "stop"
    # Wall-clock deadline: save and exit with code 85 (requeue) early enough before it. An ISO time
    # ("2025-01-31T18:00:00", local time unless it has an offset), Unix seconds, "slurm" (the job's end time from
    # SLURM_JOB_END_TIME or squeue), or null (none). A stop signal (SIGTERM, SIGUSR1) does the same at any time.
    deadline: str | None = None
    # Seconds kept free before the deadline besides one step and the measured duration of the last save; it must
    # cover the first save, whose duration is not known yet.
    deadline_margin_seconds: float = 300.0

    def validate(self, key: str) -> None:
        from ift_dist.config import ConfigError, _check_choice, _check_positive

        for name in ("every_steps", "every_minutes", "keep_last", "keep_every", "deadline_margin_seconds"):
            _check_positive(f"{key}.{name}", getattr(self, name), allow_zero=True)
        _check_choice(f"{key}.on_save_error", self.on_save_error, ("stop", "continue"))
        if not self.resume:
            raise ConfigError(f"{key}.resume: 'auto', 'never' or a path, got {self.resume!r}")


@dataclass
class ExportConfig:
    """The Hugging Face model directory written from the final checkpoint when training ends (`ift export` writes
    one from any checkpoint). docs/checkpoints.md."""

    # Export when training ends (needs train.save_at_end: the export reads the final checkpoint).
    at_end: bool = True
    # Where; null = <output_dir>/hf_model.
    dir: str | None = None
    # Largest safetensors file, e.g. "5GB", "500MB" (powers of 1000, as Hugging Face uses); a parameter larger
    # than this gets a file of its own.
    max_shard_size: str = "5GB"
    # Weight dtype of the export: "auto" = the training dtype (model.dtype resolved), or float32, bfloat16, float16.
    dtype: str = "auto"

    def validate(self, key: str) -> None:
        from ift_dist.config import ConfigError, _check_choice

        _check_choice(f"{key}.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMG]i?B|B)?\s*", self.max_shard_size, flags=re.IGNORECASE):
            raise ConfigError(
                f"{key}.max_shard_size: expected a size like '5GB' or '500MB', got {self.max_shard_size!r}"
            )
