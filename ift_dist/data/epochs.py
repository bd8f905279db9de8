"""The optimizer step count of a run: train.max_steps, or train.num_epochs turned into steps from the packed rows of one
epoch of the training plan.

The arithmetic is HF Trainer's (`Trainer.set_initial_training_values`): a partial last step counts as a step, so

    steps_per_epoch = max(1, ceil(rows_per_epoch / global_batch_rows))
    total_steps     = ceil(num_epochs x steps_per_epoch)

(ceil of the per-rank batches, then of the accumulation, is the same ceil of rows over the global batch). Our loader
never shortens a step: the last step of the final epoch is filled from the start of the next one, so a run of E epochs
reads E epochs plus less than one global batch. Rows per epoch are counted by every rank rendering and packing its own
share of one epoch through the real loader (the same streams, packer and world size as training), summed over ranks;
prepared shards know theirs. A resumed run takes the count from its checkpoint, so its LR schedule never moves.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ift_dist import dist
from ift_dist.config import BatchPlan, DataConfig, TrainConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepCount:
    """How many optimizer steps the run takes, and where the number comes from."""

    total: int
    origin: str  # "train.max_steps", "default" (neither key set), "train.num_epochs", "checkpoint"
    num_epochs: float = 0.0
    rows_per_epoch: int = 0  # packed rows of one epoch, all ranks
    global_batch_rows: int = 0
    steps_per_epoch: int = 0

    def describe(self) -> str:
        if self.origin == "train.max_steps":
            return f"{self.total} optimizer steps (train.max_steps)"
        if self.origin == "default":
            return f"{self.total} optimizer steps (the default: neither train.max_steps nor train.num_epochs is set)"
        where = "counted from the data" if self.origin == "train.num_epochs" else "from the checkpoint"
        return (
            f"{self.total} optimizer steps = ceil({self.num_epochs:g} epochs x {self.steps_per_epoch} steps per epoch); "
            f"{self.steps_per_epoch} = ceil({self.rows_per_epoch} packed rows per epoch / {self.global_batch_rows} "
            f"rows per step) ({where})"
        )

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)


def steps_for_epochs(num_epochs: float, rows_per_epoch: int, global_batch_rows: int) -> StepCount:
    """HF Trainer's arithmetic (module docstring). A product that is whole up to float rounding (1.1 x 10) is not
    rounded up to the next step."""
    if num_epochs <= 0 or global_batch_rows < 1:
        raise ValueError(
            f"need num_epochs > 0 and global_batch_rows >= 1, got {num_epochs}, {global_batch_rows}"
        )
    steps_per_epoch = max(1, math.ceil(rows_per_epoch / global_batch_rows))
    total = max(1, math.ceil(num_epochs * steps_per_epoch - 1e-9))
    return StepCount(
        total, "train.num_epochs", num_epochs, rows_per_epoch, global_batch_rows, steps_per_epoch
    )


def count_epoch_rows(data: DataConfig, tokenizer: Any, plan: BatchPlan, *, scanned: Sequence[Any] | None,
                     renderer: Any) -> int:  # fmt: skip
    """Packed rows of one epoch of the training plan, all ranks (every rank calls it: it renders its own share)."""
    from ift_dist.data.loader import build_loader

    rank, world_size = dist.rank(), dist.world_size()
    loader = build_loader(
        data, tokenizer, rank=rank, world_size=world_size, rows_per_batch=plan.micro_batch_rows, epochs=1,
        scanned=scanned, renderer=renderer,
    )  # fmt: skip
    if loader.kind == "prepared":  # one prepared row is one training row
        return loader.plan.length
    rows = sum(batch.input_ids.shape[0] for batch in loader)
    return int(dist.all_reduce([rows])[0])


def step_count(
    train: TrainConfig,
    plan: BatchPlan,
    *,
    saved: dict[str, Any] | None,
    count_rows: Any,
) -> StepCount:
    """The run's step count. train.num_epochs: the count of the checkpoint a run resumes from (`saved`: its
    train_state.json) when it was made for the same num_epochs, else `count_rows()` rows per epoch."""
    if train.step_limit is not None:
        return StepCount(train.step_limit, "train.max_steps" if train.max_steps else "default")
    previous = (saved or {}).get("steps") or {}
    if (
        previous.get("origin") in ("train.num_epochs", "checkpoint")
        and previous.get("num_epochs") == train.num_epochs
    ):
        fields = {**previous, "origin": "checkpoint"}
        return StepCount(**fields)
    logger.info("train.num_epochs=%g: counting the packed rows of one epoch (every rank renders its share)",
                train.num_epochs)  # fmt: skip
    return steps_for_epochs(train.num_epochs, int(count_rows()), plan.global_batch_rows)
