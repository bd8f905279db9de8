"""Rank helpers over torch.distributed: who am I, reductions of a few numbers, rank-aware logging, seeding.

The process group itself is created by the engine (`engine.init_distributed`, the only deepspeed door); everything
here works before that too, as a world of one.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import socket
import sys
import warnings
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as torch_dist
from tqdm import tqdm

logger = logging.getLogger(__name__)


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


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


def broadcast_object(value: object) -> object:
    """Rank 0's `value` on every rank (a picklable object: a path, a name)."""
    if not (is_initialized() and world_size() > 1):
        return value
    holder = [value]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        torch_dist.barrier()


class _AboveProgressBars(logging.StreamHandler):
    """Writes each log line above rank 0's progress bar (tqdm.write clears the bar, writes, redraws it), not onto
    the bar's line; where no bar is drawn it is a plain stream handler."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


class _RankFilter(logging.Filter):
    def __init__(self, rank_number: int):
        super().__init__()
        self.rank_number = rank_number

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank_number
        return True


def setup_logging(verbose: bool = False) -> None:
    """Rank 0 logs INFO (DEBUG with `verbose`); other ranks only WARNING and above, each line tagged with its rank,
    so they stay quiet unless something is wrong, and draw no progress bars."""
    number = rank()
    level = logging.DEBUG if verbose else logging.INFO
    handler = _AboveProgressBars(sys.stderr)
    handler.addFilter(_RankFilter(number))
    handler.setFormatter(logging.Formatter("[rank %(rank)s] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if number == 0 else logging.WARNING)
    for noisy in ("transformers", "datasets", "torch.distributed", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if number != 0:
        disable_progress_bars()
    # DeepSpeed calls collectives that torch marks deprecated (all_gather_into_tensor, ...): nothing a user can act
    # on, printed by every rank.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def disable_progress_bars() -> None:
    """No progress bars from transformers or huggingface_hub in this process (loading weights, de-quantizing a GGUF
    file, writing shards, downloads): every rank would draw the same bar, interleaved on one terminal, so only rank 0
    draws them. Works after transformers is imported, unlike the environment variables it reads at import."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # huggingface_hub's bars too
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # processes started from this one


def seed_everything(seed: int) -> None:
    """The same seed on every rank: parameters are identical anyway (loaded, then partitioned), and the data order
    comes from the data plan, not from these generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Set by `shutdown` when this process leaves a process group: its native threads live on (see exit_process).
_left_a_process_group = False


def shutdown(*, together: bool) -> None:
    """Leave the process group, every rank. `together`: the ranks ended at the same point (training finished, or
    stopped at an agreed step after a collective save), so they first wait for each other (barrier): no rank tears
    down its connections while a peer is still at work (rank 0 exports the model after the final checkpoint, the
    others wait for it, within the collective timeout: DeepSpeed's 30 minutes, `DEEPSPEED_TIMEOUT`). After a failure
    there is no barrier, as a peer may never come. Then destroy the process group (NCCL warns otherwise)."""
    global _left_a_process_group
    if not is_initialized():
        return
    _left_a_process_group = True
    if together and world_size() > 1:
        try:
            torch_dist.barrier()
        except RuntimeError as error:  # a peer died after its own end; this rank's outcome stands
            logger.warning("not every rank reached the end of the run: %s", error)
    torch_dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with `code` at once (os._exit), once everything is written: skip the interpreter's teardown.

    Why: the process group's native threads outlive destroy_process_group, since DeepSpeed keeps references to the
    groups (deepspeed.utils.groups, the engine). After a 2-rank CPU run each rank still runs two gloo groups'
    `pt_gloo_runloop` and `gloo_tcp_loop` threads, and rank 0 the TCP store's `pt_tcpstore_uv`, at interpreter exit.
    They are then torn down while the interpreter finalizes, where a native thread that needs the GIL (to drop the
    last reference to a tensor a collective used, say) is ended with pthread_exit; unwinding that through a noexcept
    C++ frame calls std::terminate: "terminate called without an active exception", SIGABRT, and DeepSpeed's launcher
    exits 250 (256 - 6) for a run that had finished and saved (pytorch/pytorch#38228, pybind/pybind11#2215).
    os._exit ends every thread at once and runs no destructor, so the exit code is the training's own.

    It also skips atexit handlers and the flushing of open files: the caller has closed what it owns (metrics, the
    W&B run, checkpoints); here the garbage collector releases what reference cycles still hold (a DataLoader
    iterator shuts its worker processes down when released), then logging and the standard streams are flushed.

    A process that never joined a process group (a config error found first) has no such threads and exits the
    usual way: its interpreter teardown is harmless, and the peers it leaves behind get time to print their own error
    before DeepSpeed's launcher kills them for this rank's exit."""
    if not _left_a_process_group:
        sys.exit(code)
    gc.collect()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream: nothing more can be written anyway
            stream.flush()
    os._exit(code)
