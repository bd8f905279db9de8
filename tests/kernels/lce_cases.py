"""Problem builders and comparison helpers shared by the linear cross-entropy kernel tests (CPU and GPU)."""

from __future__ import annotations

import torch

from ift_dist.kernels.linear_cross_entropy import fused_linear_cross_entropy
from ift_dist.kernels.reference import reference_linear_cross_entropy

IGNORE = -100

# Where the ignored labels go, on labels shaped [batch, time].
DENSITIES = ("none", "half", "whole_row", "all_but_one", "all")

OPTION_SETS = {
    "plain": {},
    "bias": {"bias": True},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"logit_softcap": 7.0},
    "everything": {"bias": True, "label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 7.0},
}


def make_problem(
    batch, time, hidden_size, vocab_size, density, *, dtype=torch.float32, device="cpu", bias=False, seed=0
):
    """hidden [batch, time, H], weight [V, H], bias [V] or None, labels [batch, time]; logits of order 1-10."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, time, hidden_size, generator=generator)
    weight = torch.randn(vocab_size, hidden_size, generator=generator) * (3.0 / hidden_size**0.5)
    bias_vector = torch.randn(vocab_size, generator=generator) if bias else None
    labels = torch.randint(0, vocab_size, (batch, time), generator=generator)
    if density == "half":
        labels[torch.rand(batch, time, generator=generator) < 0.5] = IGNORE
    elif density == "whole_row":
        labels[batch // 2] = IGNORE
    elif density == "all_but_one":
        kept = labels[batch - 1, time // 3].clone()
        labels[:] = IGNORE
        labels[batch - 1, time // 3] = kept
    elif density == "all":
        labels[:] = IGNORE
    else:
        assert density == "none", density

    def leaf(tensor):
        return None if tensor is None else tensor.to(device, dtype).requires_grad_()

    return leaf(hidden), leaf(weight), leaf(bias_vector), labels.to(device)


def loss_and_grads(function, hidden, weight, bias, labels, reduction, options, seed=1):
    """Runs `function` (ours or the reference, same keywords), backpropagates a fixed random incoming gradient;
    returns (loss, z-loss part, [grad hidden, grad weight, grad bias])."""
    keywords = {key: value for key, value in options.items() if key != "bias"}
    loss, z_part = function(
        hidden, weight, labels, bias=bias, reduction=reduction, return_z_loss=True, **keywords
    )
    generator = torch.Generator().manual_seed(seed)
    incoming = torch.rand(loss.shape, generator=generator).to(loss.device) + 0.5
    inputs = [tensor for tensor in (hidden, weight, bias) if tensor is not None]
    grads = torch.autograd.grad(loss, inputs, incoming)
    return loss.detach(), z_part, list(grads)


def reference(hidden, weight, labels, **keywords):
    """The reference on flattened tokens, reshaped back for reduction="none"."""
    loss, z_part = reference_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), **keywords
    )
    if keywords.get("reduction") == "none":
        loss, z_part = loss.view(labels.shape), z_part.view(labels.shape)
    return loss, z_part


def ours(impl, **plan):
    def function(hidden, weight, labels, **keywords):
        return fused_linear_cross_entropy(hidden, weight, labels, impl=impl, **plan, **keywords)

    return function


def naive_torch(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    reduction="sum",
    label_smoothing=0.0,
    z_loss=0.0,
    logit_softcap=None,
    return_z_loss=True,
):
    """Plain torch in the inputs' own dtype (what one writes without a fused kernel): the baseline of the
    low-precision rule "our error against fp32 is no larger than plain torch's in the same dtype"."""
    logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    flat_labels = labels.reshape(-1)
    loss_N = torch.nn.functional.cross_entropy(
        logits, flat_labels, ignore_index=IGNORE, reduction="none", label_smoothing=label_smoothing
    )
    z_N = z_loss * torch.logsumexp(logits, dim=-1).square() * (flat_labels != IGNORE)
    loss_N = loss_N + z_N
    if reduction == "none":
        return loss_N.view(labels.shape), z_N.detach().view(labels.shape)
    count = max(int((flat_labels != IGNORE).sum()), 1) if reduction == "mean" else 1
    return loss_N.sum() / count, z_N.detach().sum() / count


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    value, expected = value.double(), expected.double()
    return float((value - expected).norm() / expected.norm().clamp(min=1e-12))


def assert_matches(actual, expected, *, rtol=2e-5, atol=2e-5):
    """Loss, z-loss part and every gradient of `actual` match `expected` (both from `loss_and_grads`)."""
    loss, z_part, grads = actual
    expected_loss, expected_z_part, expected_grads = expected
    assert loss.dtype == torch.float32 and z_part.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(z_part, expected_z_part, rtol=rtol, atol=atol)
    assert len(grads) == len(expected_grads)
    for gradient, expected_gradient in zip(grads, expected_grads, strict=True):
        assert torch.isfinite(gradient).all()
        torch.testing.assert_close(gradient.float(), expected_gradient.float(), rtol=rtol, atol=atol)
