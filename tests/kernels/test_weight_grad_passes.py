"""The dW strategies in a low-precision dtype: "rows_inplace" runs 3 logits-sized matmuls without any fp32 [V, H]
buffer, and its bf16 error is that of Liger-style accumulation (one rounding per row chunk), bounded by the number of
chunks; every strategy's matmul work is proportional to the supervised tokens."""

from __future__ import annotations

import pytest
import torch
from lce_cases import loss_and_grads, make_problem, naive_torch, ours, reference, relative_error
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ift_dist.kernels.chunked import resolve_weight_grad_pass
from ift_dist.kernels.linear_cross_entropy import fused_linear_cross_entropy

BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits: round to nearest is off by at most 2^-8 relative
MATMULS = {"vocab": 4, "rows": 3, "rows_inplace": 3}


def _bf16(problem):
    hidden, weight, bias, labels = problem
    low = [
        None if tensor is None else tensor.detach().bfloat16().requires_grad_()
        for tensor in (hidden, weight, bias)
    ]
    return (*low, labels)


def _liger_style_weight_grad(hidden, weight, labels, rows_per_chunk, incoming):
    """dW as a chunked bf16 implementation computes it (Liger's `grad_weight.addmm_` per chunk): logits and their
    gradient rounded to bf16, each chunk's product exact (fp32) and added to a bf16 running sum, rounded once per
    chunk. Returns (dW, the rigorous bound u * sum_k |S_k| / |S| on the relative error the roundings add)."""
    hidden_MH = hidden.detach().float().reshape(-1, hidden.shape[-1])
    labels_M = labels.reshape(-1)
    hidden_MH, labels_M = hidden_MH[labels_M != -100], labels_M[labels_M != -100]
    logits = (hidden_MH @ weight.detach().float().T).bfloat16().float()
    dlogits = torch.softmax(logits, dim=1)
    dlogits[torch.arange(labels_M.numel()), labels_M] -= 1.0
    dlogits = (dlogits * incoming).bfloat16().float()
    running = torch.zeros_like(weight, dtype=torch.bfloat16)
    exact_partial_norms = []
    for start in range(0, labels_M.numel(), rows_per_chunk):
        product = dlogits[start : start + rows_per_chunk].T @ hidden_MH[start : start + rows_per_chunk]
        running = (running.float() + product).bfloat16()
        exact_partial_norms.append(
            float((dlogits[: start + rows_per_chunk].T @ hidden_MH[: start + rows_per_chunk]).norm())
        )
    return running, BF16_UNIT_ROUNDOFF * sum(exact_partial_norms) / exact_partial_norms[-1]


def test_rows_inplace_bf16_error_is_liger_style_and_bounded_by_chunks():
    problem = make_problem(2, 256, 64, 1000, "half")
    exact = loss_and_grads(reference, *problem, "sum", {})
    low = _bf16(problem)
    plain = loss_and_grads(naive_torch, *low, "sum", {})
    vocab = loss_and_grads(ours("torch", weight_grad_pass="vocab"), *low, "sum", {})
    incoming = float(
        torch.rand((), generator=torch.Generator().manual_seed(1)) + 0.5
    )  # as loss_and_grads draws it
    supervised = int((problem[3] != -100).sum())
    errors = {}
    for rows in (supervised, 64, 16, 4):
        mine = loss_and_grads(
            ours("torch", weight_grad_pass="rows_inplace", chunk_elements=rows * 1000), *low, "sum", {}
        )
        liger_style, bound = _liger_style_weight_grad(*low[:2], problem[3], rows, incoming)
        errors[rows] = relative_error(mine[2][1], exact[2][1])
        # The loss and dX do not depend on the dW strategy.
        torch.testing.assert_close(mine[0], vocab[0])
        torch.testing.assert_close(mine[2][0], vocab[2][0])
        # Same error as Liger-style accumulation over the same chunks (the small gap: our per-chunk softmax math).
        assert abs(errors[rows] - relative_error(liger_style, exact[2][1])) <= 0.1 * errors[rows]
        # The roundings add at most u * sum_k |S_k| / |S| (about u per chunk) to the one-chunk error.
        assert errors[rows] <= errors[supervised] + bound
    # One chunk: a single rounding, as exact as the vocabulary pass and as plain torch.
    assert errors[supervised] <= relative_error(vocab[2][1], exact[2][1]) + 1e-6
    assert errors[supervised] <= relative_error(plain[2][1], exact[2][1]) + 5e-4
    # Many chunks: the error grows, like a random walk, far below the worst-case bound of u per chunk.
    assert errors[4] > errors[supervised]
    assert errors[4] < errors[supervised] + 0.05 * BF16_UNIT_ROUNDOFF * (supervised / 4)


def test_rows_inplace_bf16_triton_interpreter_agrees():
    problem = make_problem(3, 47, 31, 123, "half", bias=True)
    options = {"bias": True, "label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 7.0}
    exact = loss_and_grads(reference, *problem, "sum", options)
    low = _bf16(problem)
    plain = loss_and_grads(naive_torch, *low, "sum", options)
    for impl in ("triton", "torch"):
        mine = loss_and_grads(
            ours(impl, weight_grad_pass="rows_inplace", chunk_elements=16 * 123), *low, "sum", options
        )
        for value, plain_value, expected in [
            (mine[0], plain[0], exact[0]),
            *zip(mine[2], plain[2], exact[2], strict=True),
        ]:
            assert relative_error(value, expected) <= relative_error(plain_value, expected) + 2e-3, impl


class _Float32Sizes(TorchDispatchMode):
    """Records the number of elements of every fp32 tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, tuple | list) else [result]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.sizes.append(tensor.numel())
        return result


@pytest.mark.parametrize("weight_grad_pass", ["rows_inplace", "vocab", "rows"])
def test_no_fp32_weight_sized_buffer(weight_grad_pass):
    # V x H = 500 x 64 = 32000 elements; the fp32 logits chunks of the torch path are 16 x 500 = 8000.
    hidden, weight, _, labels = _bf16(make_problem(2, 100, 64, 500, "half"))
    with _Float32Sizes() as recorder:
        fused_linear_cross_entropy(
            hidden, weight, labels, impl="torch", weight_grad_pass=weight_grad_pass, chunk_elements=16 * 500
        ).backward()
    weight_sized = [size for size in recorder.sizes if size >= weight.numel()]
    # "rows" is the one strategy that pays for its 3 matmuls and exact sums with an fp32 [V, H] buffer (each
    # in-place addmm into it is recorded again).
    assert bool(weight_sized) == (weight_grad_pass == "rows")
    assert weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("weight_grad_pass", ["rows_inplace", "rows"])
def test_no_fp32_weight_sized_allocation(weight_grad_pass):
    """The same at the allocator: torch's profiler records every CPU allocation, including those made inside ops."""
    from torch.profiler import ProfilerActivity, profile

    hidden, weight, _, labels = _bf16(make_problem(4, 128, 256, 2000, "none"))
    fp32_weight_bytes = weight.numel() * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fused_linear_cross_entropy(
            hidden, weight, labels, impl="torch", weight_grad_pass=weight_grad_pass, chunk_elements=64 * 2000
        ).backward()
    largest = max(event.self_cpu_memory_usage for event in profiler.events())
    assert weight.grad.numel() * 2 <= largest  # the bf16 gradient itself is seen
    assert (largest >= fp32_weight_bytes) == (weight_grad_pass == "rows")


def _matmul_flops(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


@pytest.mark.parametrize("weight_grad_pass", ["rows_inplace", "vocab", "rows", "auto"])
def test_bf16_logits_matmuls_and_half_ignored_costs_half(weight_grad_pass):
    """3 logits-sized matmuls for the row strategies, 4 for the vocabulary pass; with every other token ignored,
    exactly half the matmul FLOPs."""
    batch, time, hidden_size, vocab_size = 2, 256, 32, 500
    flops = {}
    for ignored_every_other in (False, True):
        hidden, weight, _, labels = _bf16(make_problem(batch, time, hidden_size, vocab_size, "none"))
        if ignored_every_other:
            labels[:, ::2] = -100
        flops[ignored_every_other] = _matmul_flops(
            lambda hidden=hidden, weight=weight, labels=labels: fused_linear_cross_entropy(
                hidden, weight, labels, impl="torch", weight_grad_pass=weight_grad_pass
            ).backward()
        )
    matmuls = MATMULS[resolve_weight_grad_pass(weight_grad_pass, torch.bfloat16)]
    assert flops[False] == matmuls * 2 * batch * time * hidden_size * vocab_size
    assert flops[True] * 2 == flops[False]


def test_weight_grad_pass_resolution():
    assert resolve_weight_grad_pass("auto", torch.bfloat16) == "vocab"
    assert resolve_weight_grad_pass("auto", torch.float32) == "rows"
    assert resolve_weight_grad_pass("rows_inplace", torch.bfloat16) == "rows_inplace"
    # fp32: the gradient is its own fp32 accumulator, so in place and "rows" are the same computation.
    assert resolve_weight_grad_pass("rows_inplace", torch.float32) == "rows"
    with pytest.raises(ValueError, match="weight_grad_pass"):
        fused_linear_cross_entropy(
            torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), weight_grad_pass="row"
        )


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, tuple | list) else [result]:
            if isinstance(tensor, torch.Tensor):
                self.shapes.add(tuple(tensor.shape))
        return result


@pytest.mark.parametrize("weight_grad_pass", ["rows_inplace", "vocab"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_row_strategies_gather_supervised_rows_chunk_by_chunk(weight_grad_pass, reduction):
    """With ignored tokens, the row pass gathers its chunk's rows; only the vocabulary pass, whose every matmul
    takes all supervised rows, holds a gathered copy of them [M, H]."""
    hidden, weight, _, labels = _bf16(make_problem(2, 100, 64, 500, "half"))
    supervised = int((labels != -100).sum())
    with _Shapes() as recorder:
        loss = fused_linear_cross_entropy(
            hidden,
            weight,
            labels,
            impl="torch",
            weight_grad_pass=weight_grad_pass,
            reduction=reduction,
            chunk_elements=16 * 500,
        )
        loss.sum().backward()
    assert ((supervised, 64) in recorder.shapes) == (weight_grad_pass == "vocab")
