"""The batch geometry of a run, derived from the train section, data.max_length and the world size (torch-free: the
launcher checks it before any rank starts).

A row is one packed row of at most data.max_length tokens. One optimizer step consumes

    global_batch_rows = micro_batch_rows x world_size x accumulation_steps

rows (global_batch_tokens / data.max_length when the batch is given in tokens of row capacity); the accumulation
steps are derived and must come out whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ift_dist.config.checks import ConfigError


class BatchSettings(Protocol):
    """The keys of the train section (`TrainConfig`) the geometry is derived from."""

    micro_batch_rows: int
    global_batch_rows: int | None
    global_batch_tokens: int | None


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


def batch_plan(train: BatchSettings, max_length: int, world_size: int) -> BatchPlan:
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
