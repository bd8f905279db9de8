"""The optimizer's arithmetic: the AdamW parameter groups and the learning rate as a pure function of the step (the
batch geometry is the config's: `ift_dist.config.BatchPlan`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from ift_dist.config import LrSchedule, TrainConfig

logger = logging.getLogger(__name__)


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


def learning_rate(step: int, train: TrainConfig, total_steps: int | None = None) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then cosine/linear decay to
    min_lr_ratio x peak at the run's last step, or constant. A pure function, so a resumed run needs only the step.
    total_steps: the run's step count (ift_dist.data.epochs.step_count); None = the one the config fixes
    (train.max_steps or its default), which a train.num_epochs run does not."""
    if total_steps is None:
        total_steps = train.step_limit
        if total_steps is None:
            raise ValueError("train.num_epochs: pass the step count derived from the data (total_steps)")
    peak = train.learning_rate
    if step < train.warmup_steps:
        return peak * (step + 1) / train.warmup_steps
    if train.lr_schedule == LrSchedule.constant:
        return peak
    floor = peak * train.min_lr_ratio
    decay_steps = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    if train.lr_schedule == LrSchedule.linear:
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: Any, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value
