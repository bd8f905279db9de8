"""The chunked torch path (the CPU implementation) against the reference on larger shapes, and the contract of
`fused_linear_cross_entropy`: no [N, V] tensor, ignored tokens cost nothing, gradients come from the forward pass,
bf16 no worse than plain torch, argument checks."""

from __future__ import annotations

import pytest
import torch
from lce_cases import (
    DENSITIES,
    OPTION_SETS,
    assert_matches,
    loss_and_grads,
    make_problem,
    naive_torch,
    ours,
    reference,
    relative_error,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ift_dist.kernels.linear_cross_entropy import fused_linear_cross_entropy, resolve_backend
from ift_dist.kernels.options import ChunkPlan, chunk_sizes

# N = 3 x 333 tokens, H = 64, V = 3001: the default budget gives 3 row chunks and 3 vocabulary chunks.
BATCH, TIME, HIDDEN, VOCAB = 3, 333, 64, 3001


@pytest.mark.parametrize("weight_grad_pass", ["vocab", "rows", "rows_inplace"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("density", DENSITIES)
def test_torch_path_matches_reference(density, reduction, weight_grad_pass):
    options = OPTION_SETS["everything"]
    hidden, weight, bias, labels = make_problem(BATCH, TIME, HIDDEN, VOCAB, density, bias=True)
    fused = ours("torch", weight_grad_pass=weight_grad_pass)
    actual = loss_and_grads(fused, hidden, weight, bias, labels, reduction, options)
    assert_matches(
        actual, loss_and_grads(reference, hidden, weight, bias, labels, reduction, options), rtol=5e-5
    )


@pytest.mark.parametrize("option_set", sorted(OPTION_SETS))
@pytest.mark.parametrize("chunk_elements", [None, 7 * VOCAB, 10**9])
def test_torch_path_each_option_and_chunking(option_set, chunk_elements):
    options = OPTION_SETS[option_set]
    hidden, weight, bias, labels = make_problem(
        BATCH, TIME, HIDDEN, VOCAB, "half", bias=options.get("bias", False)
    )
    fused = ours("torch", chunk_elements=chunk_elements)
    actual = loss_and_grads(fused, hidden, weight, bias, labels, "mean", options)
    assert_matches(
        actual, loss_and_grads(reference, hidden, weight, bias, labels, "mean", options), rtol=5e-5
    )


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, tuple | list) else [result]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return result


@pytest.mark.parametrize("weight_grad_pass", ["vocab", "rows", "rows_inplace"])
def test_never_holds_the_full_logits(weight_grad_pass):
    # The torch path: the driver is shared with the Triton path, whose kernels work in place (and whose CPU
    # interpreter copies its arguments, which would blur the count).
    hidden, weight, _, labels = make_problem(4, 128, 16, 1000, "none")
    budget = 64 * 1000  # an eighth of the [512, 1000] logits
    with _LargestTensor() as recorder:
        fused_linear_cross_entropy(
            hidden, weight, labels, impl="torch", weight_grad_pass=weight_grad_pass, chunk_elements=budget
        ).backward()
    # The biggest tensors allowed: a logits chunk and the gradients themselves (hidden and weight).
    assert recorder.largest <= max(budget, 1000 * 16, 512 * 16)


def _matmul_flops(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


@pytest.mark.parametrize("weight_grad_pass", ["vocab", "rows", "rows_inplace"])
def test_ignored_tokens_cost_no_matmul(weight_grad_pass):
    """Every matmul sees only supervised rows: the work is proportional to the number of supervised tokens."""
    flops = {}
    supervised = {}
    for density in ("none", "half"):
        hidden, weight, _, labels = make_problem(2, 200, 32, 500, density)
        supervised[density] = int((labels != -100).sum())
        flops[density] = _matmul_flops(
            lambda hidden=hidden, weight=weight, labels=labels: fused_linear_cross_entropy(
                hidden, weight, labels, impl="torch", weight_grad_pass=weight_grad_pass
            ).backward()
        )
    assert supervised["half"] < 0.6 * supervised["none"]
    assert flops["half"] * supervised["none"] == flops["none"] * supervised["half"]
    matmuls = 4 if weight_grad_pass == "vocab" else 3
    assert flops["none"] == matmuls * 2 * 400 * 32 * 500


def test_gradients_are_computed_in_forward_for_scalar_losses():
    hidden, weight, _, labels = make_problem(2, 50, 16, 300, "half")
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction="mean")
    assert _matmul_flops(loss.backward) == 0
    per_token = fused_linear_cross_entropy(hidden, weight, labels, reduction="none")
    assert _matmul_flops(lambda: per_token.sum().backward()) > 0


def test_no_gradient_work_without_grad():
    hidden, weight, _, labels = make_problem(2, 50, 16, 300, "none")
    with torch.no_grad():
        flops = _matmul_flops(lambda: fused_linear_cross_entropy(hidden, weight, labels))
    assert flops == 2 * 100 * 16 * 300  # the logits, nothing else


def test_frozen_weight_gets_no_gradient_and_skips_its_pass():
    hidden, weight, _, labels = make_problem(2, 50, 16, 300, "none")
    weight = weight.detach().to(torch.bfloat16)
    hidden = hidden.detach().to(torch.bfloat16).requires_grad_()
    flops = _matmul_flops(lambda: fused_linear_cross_entropy(hidden, weight, labels).backward())
    assert flops == 2 * (2 * 100 * 16 * 300)  # logits and dX; no vocabulary pass
    assert weight.grad is None and hidden.grad is not None


def test_incoming_gradient_scales_the_precomputed_gradients():
    hidden, weight, _, labels = make_problem(2, 20, 8, 50, "half")
    (3.0 * fused_linear_cross_entropy(hidden, weight, labels)).backward()
    expected = torch.autograd.grad(
        3.0 * reference(hidden, weight, labels, return_z_loss=True)[0], (hidden, weight)
    )
    torch.testing.assert_close(hidden.grad, expected[0])
    torch.testing.assert_close(weight.grad, expected[1])


def test_second_backward_is_refused():
    hidden, weight, _, labels = make_problem(1, 10, 8, 20, "none")
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.parametrize("option_set", ["plain", "everything"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_bf16_error_no_larger_than_plain_torch(option_set, reduction):
    """The low-precision rule: against an fp32 reference, our bf16 loss and gradients are no less accurate than
    plain torch's in bf16 (plus a small tolerance)."""
    options = OPTION_SETS[option_set]
    problem = make_problem(2, 150, 64, 1000, "half", bias=options.get("bias", False))
    exact = loss_and_grads(reference, *problem, reduction, options)
    low = [None if tensor is None else tensor.detach().bfloat16().requires_grad_() for tensor in problem[:3]]
    ours_bf16 = loss_and_grads(ours("torch"), *low, problem[3], reduction, options)
    plain_bf16 = loss_and_grads(naive_torch, *low, problem[3], reduction, options)
    for index in (0, 2):
        values = (
            zip(ours_bf16[index], plain_bf16[index], exact[index], strict=True)
            if index
            else [(ours_bf16[0], plain_bf16[0], exact[0])]
        )
        for mine, plain, expected in values:
            assert relative_error(mine, expected) <= relative_error(plain, expected) + 5e-4


def test_leading_dimensions_and_return_z_loss():
    hidden, weight, _, labels = make_problem(3, 7, 8, 40, "half")
    loss, z_part = fused_linear_cross_entropy(
        hidden, weight, labels, reduction="none", z_loss=0.5, return_z_loss=True
    )
    assert loss.shape == z_part.shape == (3, 7) and not z_part.requires_grad
    assert (loss[labels == -100] == 0).all() and (z_part[labels != -100] > 0).all()
    _, no_z = fused_linear_cross_entropy(hidden, weight, labels, return_z_loss=True)
    assert no_z == 0


def test_argument_checks():
    hidden, weight, _, labels = make_problem(1, 6, 8, 20, "none")
    flat_hidden, flat_labels = hidden.reshape(-1, 8), labels.reshape(-1)
    bad_labels = flat_labels.clone()
    bad_labels[2] = 20
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_cross_entropy(flat_hidden, weight, bad_labels)
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_cross_entropy(flat_hidden, weight.double(), flat_labels)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(flat_hidden, weight, flat_labels, reduction="avg")
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(flat_hidden, weight, flat_labels[:-1])
    with pytest.raises(ValueError, match="impl"):
        fused_linear_cross_entropy(flat_hidden, weight, flat_labels, impl="cuda")
    with pytest.raises(ValueError, match="logit_softcap"):
        fused_linear_cross_entropy(flat_hidden, weight, flat_labels, logit_softcap=0.0)


def test_dispatch_and_chunk_sizes():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    # Default budget: half the supervised hidden elements, with floors; columns aligned to 64.
    assert chunk_sizes(ChunkPlan("torch"), 8192, 4096, 128256) == (128, 2048)
    assert chunk_sizes(ChunkPlan("torch"), 100, 64, 150000) == (16, 10432)
    assert chunk_sizes(ChunkPlan("torch", chunk_elements=1000), 50, 8, 123) == (8, 20)


def test_autocast_leaves_the_inputs_dtype_in_charge():
    hidden, weight, _, labels = make_problem(2, 25, 16, 100, "half")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, labels, reduction="none")
    loss.sum().backward()
    assert loss.dtype == hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(
        loss, reference(hidden, weight, labels, reduction="none", return_z_loss=True)[0]
    )
