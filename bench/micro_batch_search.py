"""What a benchmark run's failure means (out of memory or another error) and the search for the largest micro batch
that fits, as pure functions of probe outcomes: bench/train_throughput.py runs the probes.

    outcome = classify_run(return_code, log_text)        # Outcome("ok" | "oom" | "failed" | "timeout", detail)
    best, probes = largest_fitting(probe, start=1, limit=64, tolerance=0.0)

A contender that runs out of memory is a result (the table says "OOM"), not a reason to abort the other contenders.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from dataclasses import dataclass

# Lines that mean a rank ran out of memory: torch's CUDA allocator, the CPU allocator, NCCL/cuBLAS allocations.
OOM_PATTERNS = (
    re.compile(r"OutOfMemoryError"),
    re.compile(r"CUDA out of memory", re.IGNORECASE),
    re.compile(r"CUBLAS_STATUS_ALLOC_FAILED"),
    re.compile(r"DefaultCPUAllocator: can't allocate memory"),
    re.compile(r"NCCL.*(out of memory|Failed to CUDA calloc)", re.IGNORECASE),
)
# The deepspeed launcher's line for a rank that ended by a signal ("exits with return code = -9"): SIGKILL is what the
# kernel's out-of-memory killer sends, so a killed rank counts as out of memory (host memory).
KILLED = re.compile(r"return code = -(\d+)")
ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b")  # "torch.x.FooError: why"
RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s*")  # torch's prefix of every line a rank prints to stderr
STATUSES = ("ok", "oom", "failed", "timeout")


@dataclass(frozen=True)
class Outcome:
    """How one run of one contender ended. `detail`: the line that shows why (empty when ok)."""

    status: str  # one of STATUSES
    detail: str = ""

    @property
    def fits(self) -> bool:
        return self.status == "ok"

    def cell(self) -> str:
        """The table cell of a run without numbers: "OOM" or "failed: <the error line>"."""
        if self.status == "oom":
            return "OOM"
        if self.status == "timeout":
            return "timeout"
        return f"failed: {self.detail}".replace("|", "/")[:160]


def classify_run(code: int | str, log_text: str) -> Outcome:
    """The outcome of a run that exited with `code` ("timeout" when it was killed for running too long) and wrote
    `log_text` (all ranks' output). Out of memory wins over every other reading: a rank that hit it takes its peers
    down with collective errors afterwards, and those lines come last."""
    if code == "timeout":
        return Outcome("timeout", "")
    lines = [RANK_PREFIX.sub("", line.strip()) for line in log_text.splitlines() if line.strip()]
    for line in lines:
        if any(pattern.search(line) for pattern in OOM_PATTERNS):
            return Outcome("oom", line[:300])
    killed = next(
        (line for line in lines if (m := KILLED.search(line)) and int(m.group(1)) == signal.SIGKILL), None
    )
    if killed is not None or code in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return Outcome("oom", killed or f"killed (exit {code}): out of host memory?")
    if code == 0:
        return Outcome("ok")
    errors = [line for line in lines if ERROR_LINE.match(line)]
    detail = errors[-1] if errors else (lines[-1] if lines else f"exit {code}, no output")
    return Outcome("failed", detail[:300])


def largest_fitting(
    probe: Callable[[int], Outcome], *, start: int = 1, limit: int = 64, tolerance: float = 0.0
) -> tuple[int | None, dict[int, Outcome]]:
    """The largest micro batch m in [1, limit] with probe(m).fits, assuming that what fits at m fits at every smaller
    m: from `start`, double while it fits (up to `limit`), or halve while it does not (down to 1), then bisect
    between the largest that fits and the smallest that does not. `tolerance` > 0 stops the bisection once the
    smallest failure is within (1 + tolerance) x the largest fit (fewer probes; the answer is then a lower bound
    that close to the true one). Returns (that m or None when even 1 does not fit, every probe's outcome by m);
    each m is probed at most once."""
    if not 1 <= start <= limit:
        raise ValueError(f"need 1 <= start ({start}) <= limit ({limit})")
    probes: dict[int, Outcome] = {}

    def fits(micro_batch: int) -> bool:
        if micro_batch not in probes:
            probes[micro_batch] = probe(micro_batch)
        return probes[micro_batch].fits

    fit, fail = None, None
    if fits(start):
        fit = start
        while fit < limit:
            candidate = min(2 * fit, limit)
            if not fits(candidate):
                fail = candidate
                break
            fit = candidate
    else:
        fail = start
        while fail > 1:
            candidate = fail // 2
            if fits(candidate):
                fit = candidate
                break
            fail = candidate
    if fit is None:
        return None, probes
    while fail is not None and fail - fit > 1 and fail > fit * (1 + tolerance):
        middle = (fit + fail) // 2
        if fits(middle):
            fit = middle
        else:
            fail = middle
    return fit, probes
