"""The reference is the spec: it agrees with torch's F.cross_entropy where torch has the option, and follows the
documented formulas (PaLM z-loss, Gemma-2 soft-capping, mean over supervised tokens) where it has not."""

from __future__ import annotations

import pytest
import torch
from lce_cases import IGNORE, make_problem

from ift_dist.kernels.reference import reference_linear_cross_entropy


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("density", ["none", "half"])
def test_reference_equals_torch_cross_entropy(reduction, label_smoothing, density):
    hidden, weight, bias, labels = make_problem(2, 37, 24, 101, density, bias=True)
    hidden, labels = hidden.reshape(-1, 24), labels.reshape(-1)
    ours = reference_linear_cross_entropy(
        hidden, weight, labels, bias=bias, reduction=reduction, label_smoothing=label_smoothing
    )
    expected = torch.nn.functional.cross_entropy(
        hidden @ weight.T + bias,
        labels,
        ignore_index=IGNORE,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    ours_grads = torch.autograd.grad(ours.sum(), (hidden, weight, bias))
    expected_grads = torch.autograd.grad(expected.sum(), (hidden, weight, bias))
    for ours_grad, expected_grad in zip(ours_grads, expected_grads, strict=True):
        torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_z_loss_and_softcap_follow_their_formulas():
    hidden, weight, _, labels = make_problem(1, 40, 16, 50, "half")
    hidden, labels = hidden.reshape(-1, 16).detach(), labels.reshape(-1)
    weight = weight.detach()
    cap, coefficient = 5.0, 1e-2
    loss, z_part = reference_linear_cross_entropy(
        hidden, weight, labels, reduction="none", z_loss=coefficient, logit_softcap=cap, return_z_loss=True
    )
    capped = cap * torch.tanh(hidden @ weight.T / cap)
    lse = torch.logsumexp(capped, dim=-1)
    supervised = labels != IGNORE
    expected_z = torch.where(supervised, coefficient * lse**2, 0.0)
    expected = torch.where(
        supervised,
        torch.nn.functional.cross_entropy(capped, labels, ignore_index=IGNORE, reduction="none") + expected_z,
        0.0,
    )
    torch.testing.assert_close(z_part, expected_z)
    torch.testing.assert_close(loss, expected)
    assert (capped.abs() < cap).all() and (loss[~supervised] == 0).all()


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_all_ignored_is_zero_not_nan(reduction):
    hidden, weight, _, labels = make_problem(2, 5, 8, 11, "all")
    loss = reference_linear_cross_entropy(
        hidden.reshape(-1, 8), weight, labels.reshape(-1), reduction=reduction
    )
    assert (loss == 0).all()
    grads = torch.autograd.grad(loss.sum(), (hidden, weight))
    assert all((gradient == 0).all() for gradient in grads)
