"""Time and peak memory of forward+backward of one linear cross-entropy implementation on one problem shape.

Peak memory is reported above the inputs and the outputs (the loss and the gradients of hidden and weight), i.e.
what the loss itself costs:
  CUDA  max_memory_allocated() during the call, minus what was allocated before it, minus the gradients' bytes.
  CPU   there is no allocator counter, so each measurement runs in a fresh process (`python
        bench/kernels_measure.py JSON`): the inputs are created and touched, the process' resident-set high-water
        mark is reset (Linux: write 5 to /proc/self/clear_refs), one forward+backward runs, and the new high-water
        mark (VmHWM) minus the resident set before the call, minus the gradients' bytes, is the peak. The parent sets
        MALLOC_MMAP_THRESHOLD_ so that glibc serves every buffer above 64 KiB with mmap and returns it on free: the
        resident set then follows the live tensors instead of keeping freed buffers in the heap.
Both are taken after `warmup` runs: the time is the median of `repeats` runs, the memory is measured on the first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# Our contenders: the automatic dispatch and explicit dW strategies (`options.ChunkPlan`), with the logits-chunk
# budget as a multiple of the default one (more rows per chunk: fewer dW roundings and gradient read-modify-writes
# for "rows_inplace", for more memory).
OURS = {
    "ours": {},
    "ours_vocab": {"weight_grad_pass": "vocab"},
    "ours_rows": {"weight_grad_pass": "rows"},
    "ours_rows_inplace": {"weight_grad_pass": "rows_inplace"},
    "ours_rows_inplace_x4": {"weight_grad_pass": "rows_inplace", "chunk_scale": 4},
}
IMPLS = (*OURS, "torch", "torch_fused", "liger", "liger_fp32_accum")
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Case:
    tokens: int
    hidden_size: int
    vocab_size: int
    dtype: str  # "float32" | "bfloat16"
    ignored: float  # fraction of labels set to the ignore index
    impl: str
    device: str  # "cpu" | "cuda"
    warmup: int = 1
    repeats: int = 3
    threads: int = 1


def loss_function(impl: str, device: str):
    """A callable (hidden, weight, labels) -> summed loss, or None when the implementation is not available here."""
    functional = torch.nn.functional
    if impl in OURS:
        return _ours(**OURS[impl])
    if impl == "torch":
        return lambda hidden, weight, labels: functional.cross_entropy(
            hidden @ weight.T, labels, reduction="sum"
        )
    if impl == "torch_fused":
        if not hasattr(functional, "linear_cross_entropy") or not hasattr(
            torch.nn, "LinearCrossEntropyOptions"
        ):
            return None
        options = (
            torch.nn.LinearCrossEntropyOptions()
        )  # the chunked path; options=None is the full-logits one
        return lambda hidden, weight, labels: functional.linear_cross_entropy(
            hidden, weight, labels, reduction="sum", options=options
        )
    if impl.startswith("liger"):
        if device != "cuda":
            return None  # Liger's kernels are Triton GPU kernels
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except ImportError:
            return None
        accum_dtype = torch.float32 if impl == "liger_fp32_accum" else None
        return lambda hidden, weight, labels: liger_fused_linear_cross_entropy(
            hidden, weight, labels, reduction="sum", accum_dtype=accum_dtype
        )
    raise ValueError(f"unknown implementation {impl!r}")


def _ours(weight_grad_pass: str = "auto", chunk_scale: int = 1):
    from ift_dist.kernels.linear_cross_entropy import fused_linear_cross_entropy
    from ift_dist.kernels.options import default_chunk_elements

    def loss(hidden, weight, labels):
        chunk_elements = None
        if chunk_scale != 1:
            supervised = int((labels != -100).sum())
            chunk_elements = chunk_scale * default_chunk_elements(supervised, hidden.shape[-1])
        return fused_linear_cross_entropy(
            hidden,
            weight,
            labels,
            reduction="sum",
            weight_grad_pass=weight_grad_pass,
            chunk_elements=chunk_elements,
        )

    return loss


def make_inputs(case: Case, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    hidden = torch.randn(case.tokens, case.hidden_size, generator=generator).to(case.device, dtype)
    weight = (torch.randn(case.vocab_size, case.hidden_size, generator=generator) / case.hidden_size**0.5).to(
        case.device, dtype
    )
    labels = torch.randint(0, case.vocab_size, (case.tokens,), generator=generator)
    labels[torch.rand(case.tokens, generator=generator) < case.ignored] = -100
    return hidden.requires_grad_(), weight.requires_grad_(), labels.to(case.device)


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _step(function, hidden, weight, labels) -> None:
    hidden.grad = weight.grad = None
    function(hidden, weight, labels).backward()


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_here(case: Case) -> dict:
    """Runs the case in this process; see the module docstring for what the numbers mean."""
    torch.set_num_threads(case.threads)
    function = loss_function(case.impl, case.device)
    if function is None:
        return {"status": "n/a"}
    hidden, weight, labels = make_inputs(case)
    output_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    try:
        for _ in range(case.warmup):
            _step(function, hidden, weight, labels)
        # Memory is measured on the first timed run, a warm one (first calls allocate one-off workspaces), with
        # the previous gradients released first so that the new ones count as the outputs they are.
        hidden.grad = weight.grad = None
        times = []
        for repeat in range(max(case.repeats, 1)):
            if repeat == 0 and case.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            elif repeat == 0:
                before = _proc_status_kib("VmRSS") * 1024
                Path("/proc/self/clear_refs").write_text("5")
            _synchronize(case.device)
            start = time.perf_counter()
            _step(function, hidden, weight, labels)
            _synchronize(case.device)
            times.append(time.perf_counter() - start)
            if repeat == 0:
                if case.device == "cuda":
                    peak = torch.cuda.max_memory_allocated() - before
                else:
                    peak = _proc_status_kib("VmHWM") * 1024 - before
    except torch.OutOfMemoryError:
        return {"status": "OOM"}
    return {
        "status": "ok",
        "time_ms": 1e3 * statistics.median(times),
        "peak_mib": (peak - output_bytes) / MIB,
    }


def measure_in_fresh_process(case: Case, timeout_s: float = 900.0) -> dict:
    """CPU measurements: a fresh interpreter per case, so the resident-set high-water mark belongs to it alone."""
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(case.threads))
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(dataclasses.asdict(case))],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout_s,
        check=False,
    )
    if completed.returncode != 0:
        return {"status": "error", "detail": completed.stderr.strip().splitlines()[-1:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure_here(Case(**json.loads(sys.argv[1])))))
