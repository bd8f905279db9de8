"""The public entry point: validate the arguments, pick an implementation, run the chunked autograd function."""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

from .chunked import LinearCrossEntropyFunction
from .options import IMPLEMENTATIONS, ChunkPlan, LossSpec

logger = logging.getLogger(__name__)


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(impl: str, device: torch.device) -> str:
    """ "triton" or "torch" for `impl` on `device`; "auto" means Triton on CUDA when it is installed.

    Forcing "triton" on CPU runs the kernels through Triton's interpreter: exact, but only fast enough for tests."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else "torch"
    if impl == "triton" and not triton_importable():
        raise ImportError("impl='triton' needs the triton package")
    return impl


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    return_z_loss: bool = False,
    impl: str = "auto",
    weight_grad_pass: str = "auto",
    chunk_elements: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of `labels` under the logits hidden @ weight.T (+ bias), without materialising the logits.

    hidden [N, H] (or [..., H]), weight [V, H], labels [N] (or [...]) of class indices or `ignore_index`, bias [V].
    The semantics (label smoothing, z-loss, soft-capping, reductions) are those of
    `reference.reference_linear_cross_entropy`; losses come back in fp32. Differentiable for hidden, weight and bias.

    return_z_loss: also return the z-loss part (already included in the loss, same reduction, detached) for logging.
    impl: "auto" (Triton on CUDA, chunked torch elsewhere), "triton" or "torch".
    weight_grad_pass: how dW is accumulated, see `options.ChunkPlan`: "auto", "vocab", "rows" or "rows_inplace".
    chunk_elements: the most elements of one logits chunk; None picks a size from the shapes (`options.chunk_sizes`).
    """
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"need hidden [..., H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match hidden {tuple(hidden.shape)} without its last dim"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold class indices (an integer dtype), got {labels.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and (tensor.dtype != hidden.dtype or tensor.device != hidden.device):
            raise ValueError(
                f"{name} must have hidden's dtype and device ({hidden.dtype}, {hidden.device}); "
                f"got {tensor.dtype}, {tensor.device}"
            )
    spec = LossSpec(ignore_index, reduction, float(label_smoothing), float(z_loss), logit_softcap)
    plan = ChunkPlan(resolve_backend(impl, hidden.device), weight_grad_pass, chunk_elements)

    grad_enabled = torch.is_grad_enabled()
    needs = (
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
        grad_enabled and bias is not None and bias.requires_grad,
    )
    hidden_NH = hidden.reshape(-1, hidden.shape[-1])
    labels_N = labels.reshape(-1).long()
    loss, z_part = LinearCrossEntropyFunction.apply(hidden_NH, weight, bias, labels_N, spec, plan, needs)
    if reduction == "none":
        loss, z_part = loss.view(labels.shape), z_part.view(labels.shape)
    return (loss, z_part) if return_z_loss else loss
