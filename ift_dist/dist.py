"""Rank helpers over torch.distributed: who am I, reductions of a few numbers, rank-aware logging, seeding.

The process group itself is created by the engine (`engine.init_distributed`, the only deepspeed door); everything
here works before that too, as a world of one.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
import warnings

import numpy as np
import torch
import torch.distributed as torch_dist

logger = logging.getLogger(__name__)


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def use_cuda() -> bool:
    """CUDA when present, unless DeepSpeed is told to use its CPU accelerator (DS_ACCELERATOR=cpu: CPU tests and
    debugging on a GPU machine)."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


def device() -> torch.device:
    """This rank's device: its GPU (LOCAL_RANK) with CUDA, else the CPU."""
    return torch.device("cuda", local_rank()) if use_cuda() else torch.device("cpu")


def set_single_process_defaults() -> None:
    """`python -m ift_dist.train` without a launcher: a world of one on this machine (a free rendezvous port)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**defaults, "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(name, value)


def all_reduce(values: list[float], op: str = "sum", *, on: torch.device | None = None) -> list[float]:
    """Sum (or max, min) a few numbers over all ranks, in float64 (token counts stay exact up to 2**53)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=on or device())
    if is_initialized() and world_size() > 1:
        ops = {"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX, "min": torch_dist.ReduceOp.MIN}
        torch_dist.all_reduce(tensor, op=ops[op])
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank."""
    return all_reduce([float(flag)], "max")[0] > 0


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        torch_dist.barrier()


class _RankFilter(logging.Filter):
    def __init__(self, rank_number: int):
        super().__init__()
        self.rank_number = rank_number

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank_number
        return True


def setup_logging(verbose: bool = False) -> None:
    """Rank 0 logs INFO (DEBUG with `verbose`); other ranks only WARNING and above, each line tagged with its rank,
    so they stay quiet unless something is wrong."""
    number = rank()
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(number))
    handler.setFormatter(logging.Formatter("[rank %(rank)s] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if number == 0 else logging.WARNING)
    for noisy in ("transformers", "datasets", "torch.distributed", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DeepSpeed calls collectives that torch marks deprecated (all_gather_into_tensor, ...): nothing a user can act
    # on, printed by every rank.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def seed_everything(seed: int) -> None:
    """The same seed on every rank: parameters are identical anyway (loaded, then partitioned), and the data order
    comes from the data plan, not from these generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shutdown() -> None:
    """Leave the process group (a clean exit; NCCL warns otherwise)."""
    if is_initialized():
        torch_dist.destroy_process_group()
