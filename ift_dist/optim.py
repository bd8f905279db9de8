"""What one optimizer step is: the batch geometry, the AdamW parameter groups and the learning rate as a pure
function of the step.

Batch geometry. A row is one packed row of at most data.max_length tokens. One optimizer step consumes

    global_batch_rows = micro_batch_rows x world_size x accumulation_steps

rows (global_batch_tokens / data.max_length when the batch is given in tokens of row capacity); the accumulation
steps are derived and must come out whole.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ift_dist.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    """The derived batch geometry of a run on `world_size` ranks."""

    world_size: int
    micro_batch_rows: int  # rows per rank per forward/backward
    accumulation_steps: int  # micro batches per rank per optimizer step
    global_batch_rows: int  # rows per optimizer step, all ranks
    max_length: int  # tokens one row can hold

    @property
    def global_batch_tokens(self) -> int:
        """Token capacity of one step (real tokens are fewer by the packing efficiency)."""
        return self.global_batch_rows * self.max_length

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch_rows} rows ({self.global_batch_tokens} tokens of capacity) = "
            f"{self.micro_batch_rows} rows per micro batch x {self.world_size} ranks x "
            f"{self.accumulation_steps} accumulation steps"
        )


def batch_plan(train: TrainConfig, max_length: int, world_size: int) -> BatchPlan:
    """Derive the accumulation steps; the error names the key to change and the values that would work."""
    per_pass = train.micro_batch_rows * world_size
    if train.global_batch_tokens is not None:
        rows, key = train.global_batch_tokens // max_length, "train.global_batch_tokens"
        unit = max_length
    elif train.global_batch_rows is not None:
        rows, key, unit = train.global_batch_rows, "train.global_batch_rows", 1
    else:
        rows, key, unit = per_pass, "train.global_batch_rows", 1
    if rows % per_pass or rows == 0:
        lower = max(per_pass, rows // per_pass * per_pass)
        raise ConfigError(
            f"{key}: {rows} rows per step is not a multiple of train.micro_batch_rows x world size = "
            f"{train.micro_batch_rows} x {world_size} = {per_pass}; e.g. {lower * unit} or "
            f"{(lower + per_pass) * unit}"
        )
    return BatchPlan(world_size, train.micro_batch_rows, rows // per_pass, rows, max_length)


def parameter_groups(
    named_parameters: Iterable[tuple[str, Any]], weight_decay: float
) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices with weight decay, everything of fewer than 2 dimensions (norm weights, biases)
    without. Under ZeRO-3 a parameter is an empty shard; its real shape is `ds_shape`."""
    decay, no_decay = [], []
    for _, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        shape = getattr(parameter, "ds_shape", parameter.shape)
        (decay if len(shape) >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def learning_rate(step: int, train: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then cosine/linear decay to
    min_lr_ratio x peak at max_steps, or constant. A pure function, so a resumed run needs only the step."""
    peak = train.learning_rate
    if step < train.warmup_steps:
        return peak * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return peak
    floor = peak * train.min_lr_ratio
    decay_steps = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    if train.lr_schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: Any, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value
