"""The layout of a run's output directory: every path of a run and of its checkpoints is named here and nowhere else.

    <output_dir>/
      config.yaml  metrics.jsonl  samples.jsonl  wandb_run_id  logs/  model_files/  hf_model/
      eval/step_<N>/<benchmark>/  predictions.jsonl  results.json      (eval.benchmarks scored during training)
      quality/  quality.json  removed.jsonl  score_cache.jsonl             (what data.quality removed, and why)
      test_split/<source>.jsonl                  (data.test_fraction: records held out of training and evaluation)
      checkpoints/
        latest                  "step_<N>", the newest complete checkpoint
        best                    "step_<N>", the checkpoint of the best eval metric (checkpoint.keep_best)
        step_<N>/               zero_pp_rank_*  <component>_rank_<r>.pt  train_state.json  model_files/  complete.json
          universal/            DeepSpeed's universal version (a resume on another world size)

Torch-free (stdlib only), so the launcher can use it on a login node. docs/checkpoints.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ift_dist.checkpoint.atomic import write_atomic

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
MARKER = "complete.json"
TRAIN_STATE = "train_state.json"
MODEL_FILES = "model_files"
UNIVERSAL = "universal"
STEP_PREFIX = "step_"


def step_of(path: Path) -> int | None:
    """N of a step_<N> directory name, else None."""
    prefix, _, number = path.name.partition("_")
    return int(number) if f"{prefix}_" == STEP_PREFIX and number.isdigit() else None


def rank_file(directory: Path, name: str, rank: int) -> Path:
    """Where rank `rank` keeps the state of the checkpoint component `name` in a step_<N> directory."""
    return directory / f"{name}_rank_{rank:05d}.pt"


def locate(path: Path) -> tuple[Path, Path | None]:
    """How a path given by a user names checkpoints (checkpoint.resume, `ift export`): (the checkpoints directory,
    the step_<N> directory it names or None). A step_<N> directory names itself; a run directory (one that holds
    checkpoints/) its checkpoints; any other path is taken for a checkpoints directory."""
    path = Path(path)
    if step_of(path) is not None:
        return path.parent, path
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS, None
    return path, None


class RunDir:
    """The paths of one run, from its output_dir. A plain value: it creates nothing but what a method says."""

    def __init__(self, output_dir: str | Path):
        self.root = Path(output_dir)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def config(self) -> Path:
        """The resolved config of the run (rank 0 writes it at the start)."""
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        """One JSON record per optimizer step and per evaluation."""
        return self.root / "metrics.jsonl"

    @property
    def quality(self) -> Path:
        """data.quality's decisions: quality.json (counts), removed.jsonl (every removal), caches."""
        return self.root / "quality"

    @property
    def test_split(self) -> Path:
        """data.test_fraction's records, one <source>.jsonl per training source in the source's row format."""
        return self.root / "test_split"

    @property
    def samples(self) -> Path:
        """Answers to train.sample_prompts before and after training."""
        return self.root / "samples.jsonl"

    @property
    def wandb_run_id(self) -> Path:
        """The W&B run id: a run restarted in this directory continues the same W&B run."""
        return self.root / "wandb_run_id"

    @property
    def logs(self) -> Path:
        """Per-rank logs written by the launcher."""
        return self.root / "logs"

    @property
    def model_files(self) -> Path:
        """config.json, generation_config.json and the tokenizer for the export; every checkpoint copies them."""
        return self.root / MODEL_FILES

    @property
    def hf_model(self) -> Path:
        """The default target of the export at the end of training (export.dir overrides it)."""
        return self.root / "hf_model"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def latest(self) -> Path:
        """The file naming the newest complete checkpoint."""
        return self.checkpoints / LATEST

    @property
    def best(self) -> Path:
        """The file naming the checkpoint of the best eval metric (checkpoint.keep_best)."""
        return self.checkpoints / BEST

    def eval_results(self, step: int, label: str) -> Path:
        """Where the benchmark `label` (eval.benchmarks) scored after optimizer step `step` writes its results."""
        return self.root / "eval" / f"{STEP_PREFIX}{step}" / label

    def step(self, step: int) -> Path:
        """The checkpoint directory of optimizer step `step`."""
        return self.checkpoints / f"{STEP_PREFIX}{step}"

    def truncate_metrics(self, step: int) -> None:
        """Drop the records after `step` from metrics.jsonl (rank 0, on resume): the steps a crashed run logged after
        its last checkpoint are trained again, and the file then reads as one uninterrupted run."""
        path = self.metrics
        if not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not line.strip() or json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            logger.info("%s: dropped %d records after step %d", path.name, len(lines) - len(kept), step)
            write_atomic(path, "".join(kept))
