"""Per-chunk logit math as Triton kernels: softmax statistics and the in-place logits gradient.

Same contract as `torch_logits.py`. On CUDA tensors the kernels are compiled; on CPU tensors they run through
Triton's interpreter (the same source, executed with numpy), which is how the CPU tests check them without a GPU and
without setting TRITON_INTERPRET for the whole process.

  _row_loss_kernel  one program per row of a [R, V] chunk: an online max / sum-exp sweep in fp32 gives lse, the
                    loss and the z-loss; a second sweep (optional) overwrites the row with its gradient.
  _dlogits_kernel   a 2-D grid over a [R, C] chunk of vocabulary columns: overwrites each logit with its gradient,
                    given the row's lse from the first pass.

Launch configurations (block sizes, warps): on CUDA, `triton.autotune` times a few configurations of the dlogits
kernel the first time it sees a key (the column count, the constexpr flags, the dtype) and keeps the fastest; the
kernel overwrites its chunk, so the tuner restores it after every trial run (`restore_value`: one extra chunk-sized
copy, during tuning only). The key leaves out the number of rows, which changes with every batch's supervised tokens.
That kernel is elementwise, so every configuration writes the same bits. The row kernel reduces over the vocabulary,
and its block size and warps set the order of that sum: a configuration picked by timing could differ between the
processes of one run or between a run and its resume, and "resumed == uninterrupted" would no longer hold bitwise.
So its configuration is a fixed function of the shape (4096-wide blocks, 8 warps); IFT_TUNE_ROW_KERNEL=1 autotunes it
over ROW_CONFIGS, for benchmarks. Under the interpreter (CPU tensors) one small fixed configuration keeps the tests
fast and covers the partial last block.
"""

from __future__ import annotations

import functools
import os
import types

import torch
import triton
import triton.language as tl
import triton.testing

from .options import LossSpec


@triton.jit
def _add(left, right):
    return left + right


@triton.jit
def _maximum(left, right):
    return tl.maximum(left, right)


# tl.sum / tl.max are @jit functions of triton.language; one compiled for the GPU cannot run inside the interpreter.
# Reducing with their combine functions directly gives the same GPU code, and the interpreter recognises these
# objects and reduces with numpy. Our own combine functions are the fallback should the private names move.
_SUM_COMBINE = getattr(tl.standard, "_sum_combine", _add)
_MAX_COMBINE = getattr(tl.standard, "_elementwise_max", _maximum)


@triton.jit
def _softcap(z, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both tails in fp32 (exp overflows to inf -> 1, underflows -> -1).
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    return z


@triton.jit
def _gradient(
    capped,
    columns,
    lse,
    label,
    scale,
    target_weight,
    smoothing_per_class,
    z_loss,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
):
    # dLoss/ds_j = p_j * (1 + 2 * z_loss * lse) - eps / V - (1 - eps) * [j == y], then times ds/dz = 1 - (s/cap)^2.
    gradient = tl.exp(capped - lse) * (1.0 + 2.0 * z_loss * lse) - smoothing_per_class
    gradient = tl.where(columns == label, gradient - target_weight, gradient)
    if HAS_SOFTCAP:
        ratio = capped / softcap
        gradient = gradient * (1.0 - ratio * ratio)
    return gradient * scale


@triton.jit
def _row_loss_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    scale_ptr,
    lse_ptr,
    loss_ptr,
    z_loss_ptr,
    vocab_size,
    target_weight,
    smoothing_per_class,
    z_loss,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)

    # Sweep 1: online logsumexp, the sum of all logits (label smoothing) and the target logit, all in fp32.
    running_max = float("-inf")
    running_sum = 0.0
    sum_logits = 0.0
    target_logit = 0.0
    for start in range(0, vocab_size, BLOCK_V):
        columns = start + tl.arange(0, BLOCK_V)
        mask = columns < vocab_size
        capped = _softcap(
            tl.load(row_ptr + columns, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP
        )
        capped = tl.where(mask, capped, float("-inf"))
        block_max = tl.reduce(capped, 0, _MAX_COMBINE)
        new_max = tl.maximum(running_max, block_max)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.reduce(
            tl.exp(capped - new_max), 0, _SUM_COMBINE
        )
        running_max = new_max
        sum_logits += tl.reduce(tl.where(mask, capped, 0.0), 0, _SUM_COMBINE)
        target_logit += tl.reduce(tl.where(columns == label, capped, 0.0), 0, _SUM_COMBINE)
    lse = running_max + tl.log(running_sum)
    z_part = z_loss * lse * lse
    loss = lse - target_weight * target_logit - smoothing_per_class * sum_logits + z_part
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, loss)
    tl.store(z_loss_ptr + row, z_part)

    # Sweep 2: overwrite the row with its gradient, in the chunk's dtype.
    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr + row)
        for start in range(0, vocab_size, BLOCK_V):
            columns = start + tl.arange(0, BLOCK_V)
            mask = columns < vocab_size
            logits = tl.load(row_ptr + columns, mask=mask, other=0.0).to(tl.float32)
            capped = _softcap(logits, softcap, HAS_SOFTCAP)
            gradient = _gradient(
                capped,
                columns,
                lse,
                label,
                scale,
                target_weight,
                smoothing_per_class,
                z_loss,
                softcap,
                HAS_SOFTCAP,
            )
            tl.store(row_ptr + columns, gradient.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dlogits_kernel(
    logits_ptr,
    stride_row,
    n_rows,
    n_columns,
    col_start,
    labels_ptr,
    scale_ptr,
    lse_ptr,
    target_weight,
    smoothing_per_class,
    z_loss,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    columns = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (columns < n_columns)[None, :]
    pointers = logits_ptr + rows.to(tl.int64)[:, None] * stride_row + columns[None, :]
    capped = _softcap(tl.load(pointers, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    label = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    gradient = _gradient(
        capped,
        (columns + col_start)[None, :],
        lse[:, None],
        label[:, None],
        scale[:, None],
        target_weight,
        smoothing_per_class,
        z_loss,
        softcap,
        HAS_SOFTCAP,
    )
    tl.store(pointers, gradient.to(logits_ptr.dtype.element_ty), mask=mask)


# GPU candidates. Row kernel: one program streams a row in BLOCK_V-wide blocks (4096 fp32 = 16 KiB per sweep step was
# the fixed choice; wider blocks mean fewer loop trips, more warps more loads in flight). dlogits kernel: elementwise
# tiles of BLOCK_R x BLOCK_C; wide rows give coalesced 512-1024 byte stores.
ROW_CONFIGS = [
    triton.Config({"BLOCK_V": block}, num_warps=warps)
    for block, warps in ((4096, 8), (2048, 4), (2048, 8), (4096, 16), (8192, 16))
]
DLOGITS_CONFIGS = [
    triton.Config({"BLOCK_R": block_rows, "BLOCK_C": block_columns}, num_warps=warps)
    for block_rows, block_columns, warps in (
        (16, 256, 4),
        (8, 512, 4),
        (32, 256, 8),
        (16, 512, 8),
        (64, 128, 8),
    )
]
# Interpreter: small blocks, so that the CPU tests' odd shapes run partial blocks.
INTERPRETER_ROW_META = {"BLOCK_V": 64}
INTERPRETER_DLOGITS_META = {"BLOCK_R": 16, "BLOCK_C": 64}


def _time_candidate(kernel_call, quantiles):
    """Triton's timing with a shorter budget than its default 25 ms warm-up + 100 ms per candidate: a chunk kernel
    takes 0.01-1 ms, so 20 ms still averages many runs, and a new key (a test grid has dozens) tunes in ~0.1 s."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


_row_loss_tuned = triton.autotune(
    configs=ROW_CONFIGS,
    key=["vocab_size", "HAS_SOFTCAP", "COMPUTE_GRAD"],
    restore_value=["logits_ptr"],
    do_bench=_time_candidate,
)(_row_loss_kernel)
_dlogits_tuned = triton.autotune(
    configs=DLOGITS_CONFIGS,
    key=["n_columns", "HAS_SOFTCAP"],
    restore_value=["logits_ptr"],
    do_bench=_time_candidate,
)(_dlogits_kernel)


@functools.cache
def _interpreted_kernels() -> types.SimpleNamespace:
    """The kernels above wrapped for Triton's interpreter, in a private copy of this module's globals so the helper
    kernels they call resolve to interpreted twins too (a compiled helper cannot be called from Python)."""
    from triton.runtime.interpreter import InterpretedFunction

    private_globals = dict(globals())
    twins = {}
    for name, value in globals().items():
        # Only this module's kernels: triton.language's combine functions stay as they are (see _SUM_COMBINE).
        if isinstance(value, triton.runtime.JITFunction) and value.fn.__module__ == __name__:
            function = value.fn
            clone = types.FunctionType(
                function.__code__,
                private_globals,
                function.__name__,
                function.__defaults__,
                function.__closure__,
            )
            twins[name] = InterpretedFunction(clone)
        elif isinstance(value, InterpretedFunction):
            # TRITON_INTERPRET=1 was set before this module was imported: @triton.jit already interprets.
            twins[name] = value
    private_globals.update(twins)
    return types.SimpleNamespace(**twins)


def row_launch(device: torch.device, vocab_size: int) -> tuple:
    """(row kernel, its fixed meta-parameters): on a GPU the kernel with a configuration fixed by the shape (the
    autotuned one with IFT_TUNE_ROW_KERNEL=1: not reproducible between processes), the interpreted twin on CPU."""
    if device.type == "cpu":
        return _interpreted_kernels()._row_loss_kernel, INTERPRETER_ROW_META
    if os.environ.get("IFT_TUNE_ROW_KERNEL") == "1":
        return _row_loss_tuned, {}
    return _row_loss_kernel, {"BLOCK_V": min(4096, triton.next_power_of_2(vocab_size)), "num_warps": 8}


def dlogits_launch(device: torch.device) -> tuple:
    """(dlogits kernel, its fixed meta-parameters): the autotuned kernel on a GPU, the interpreted twin on CPU."""
    if device.type == "cpu":
        return _interpreted_kernels()._dlogits_kernel, INTERPRETER_DLOGITS_META
    return _dlogits_tuned, {}


def _scalars(spec: LossSpec, vocab_size: int) -> dict:
    return {
        "target_weight": 1.0 - spec.label_smoothing,
        "smoothing_per_class": spec.label_smoothing / vocab_size,
        "z_loss": spec.z_loss,
        "softcap": spec.logit_softcap or 1.0,
        "HAS_SOFTCAP": spec.logit_softcap is not None,
    }


def row_stats_(
    logits_RV: torch.Tensor,
    labels_R: torch.Tensor,
    row_scale_R: torch.Tensor,
    spec: LossSpec,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, loss, z-loss part) per row, fp32 [R], of full-vocabulary logits [R, V] whose labels are all supervised.

    With `compute_grad`, the chunk is overwritten with row_scale * dLoss/dlogits (in its own dtype)."""
    rows, vocab_size = logits_RV.shape
    assert logits_RV.stride(1) == 1, "the logits chunk must be row-major"
    lse_R, loss_R, z_loss_R = torch.empty((3, rows), dtype=torch.float32, device=logits_RV.device)
    kernel, meta = row_launch(logits_RV.device, vocab_size)
    kernel[(rows,)](
        logits_RV,
        logits_RV.stride(0),
        labels_R,
        row_scale_R,
        lse_R,
        loss_R,
        z_loss_R,
        vocab_size,
        COMPUTE_GRAD=compute_grad,
        **meta,
        **_scalars(spec, vocab_size),
    )
    return lse_R, loss_R, z_loss_R


def dlogits_(
    logits_RC: torch.Tensor,
    lse_R: torch.Tensor,
    labels_R: torch.Tensor,
    row_scale_R: torch.Tensor,
    col_start: int,
    vocab_size: int,
    spec: LossSpec,
) -> None:
    """Overwrites raw logits [R, C] (vocabulary columns col_start..col_start + C) with row_scale * dLoss/dlogits,
    given each row's logsumexp over the whole vocabulary."""
    rows, columns = logits_RC.shape
    assert logits_RC.stride(1) == 1, "the logits chunk must be row-major"
    kernel, meta = dlogits_launch(logits_RC.device)

    def grid(launch: dict) -> tuple[int, int]:
        return triton.cdiv(rows, launch["BLOCK_R"]), triton.cdiv(columns, launch["BLOCK_C"])

    kernel[grid](
        logits_RC,
        logits_RC.stride(0),
        rows,
        columns,
        col_start,
        labels_R,
        row_scale_R,
        lse_R,
        **meta,
        **_scalars(spec, vocab_size),
    )
