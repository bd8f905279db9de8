"""How the ranks agree during a save or a resume: every rank's value (a file list, an error) on every rank."""

from __future__ import annotations

from typing import Any

import torch.distributed as torch_dist

from ift_dist import dist


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not (dist.is_initialized() and dist.world_size() > 1):
        return [value]
    values: list[Any] = [None] * dist.world_size()
    torch_dist.all_gather_object(values, value)
    return values


def agree(error: str | None) -> list[str]:
    """Every rank's error (None = fine) of one stage of a save, on every rank."""
    return [f"rank {rank}: {text}" for rank, text in enumerate(gather(error)) if text is not None]
