"""Per-chunk logit math in plain torch: softmax statistics and the in-place logits gradient (CPU and fallback path).

Both functions take a chunk of raw logits in the input dtype (the matmul output, owned by the caller) and do all math
in fp32. `triton_logits.py` implements the same two functions with the same contract as Triton kernels.
"""

from __future__ import annotations

import torch

from .options import LossSpec


def _capped_fp32(logits: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """The soft-capped logits in fp32; reuses the chunk's memory when it is already fp32 (the caller owns it)."""
    capped = logits.float()
    if spec.logit_softcap is not None:
        capped.div_(spec.logit_softcap).tanh_().mul_(spec.logit_softcap)
    return capped


def _gradient_from_capped_(
    capped_RC: torch.Tensor,
    lse_R: torch.Tensor,
    labels_R: torch.Tensor,
    row_scale_R: torch.Tensor,
    col_start: int,
    vocab_size: int,
    spec: LossSpec,
) -> torch.Tensor:
    """Overwrites capped logits s [R, C] (columns col_start.. of the vocabulary) with dLoss/dz, scaled per row.

    dLoss/ds_j = p_j * (1 + 2 * z_loss * lse) - eps / V - (1 - eps) * [j == y];  dz = ds * (1 - (s / cap)^2)."""
    derivative_RC = None
    if spec.logit_softcap is not None:
        # Needed before s is overwritten by p: d(cap * tanh(z / cap)) / dz = 1 - tanh^2 = 1 - (s / cap)^2.
        derivative_RC = torch.square(capped_RC / spec.logit_softcap).neg_().add_(1.0)
    gradient_RC = capped_RC.sub_(lse_R[:, None]).exp_()
    if spec.z_loss:
        gradient_RC.mul_((1.0 + 2.0 * spec.z_loss * lse_R)[:, None])
    if spec.label_smoothing:
        gradient_RC.sub_(spec.label_smoothing / vocab_size)
    local_R = labels_R - col_start
    rows = torch.nonzero((local_R >= 0) & (local_R < gradient_RC.shape[1])).squeeze(1)
    gradient_RC[rows, local_R[rows]] -= 1.0 - spec.label_smoothing
    if derivative_RC is not None:
        gradient_RC.mul_(derivative_RC)
    return gradient_RC.mul_(row_scale_R[:, None])


def row_stats_(
    logits_RV: torch.Tensor,
    labels_R: torch.Tensor,
    row_scale_R: torch.Tensor,
    spec: LossSpec,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, loss, z-loss part) per row, fp32 [R], of full-vocabulary logits [R, V] whose labels are all supervised.

    With `compute_grad`, the chunk is overwritten with row_scale * dLoss/dlogits (in its own dtype)."""
    vocab_size = logits_RV.shape[1]
    capped_RV = _capped_fp32(logits_RV, spec)
    lse_R = torch.logsumexp(capped_RV, dim=1)
    loss_R = lse_R - (1.0 - spec.label_smoothing) * capped_RV.gather(1, labels_R[:, None]).squeeze(1)
    if spec.label_smoothing:
        loss_R -= (spec.label_smoothing / vocab_size) * capped_RV.sum(dim=1)
    z_loss_R = spec.z_loss * lse_R.square()
    loss_R += z_loss_R
    if compute_grad:
        gradient_RV = _gradient_from_capped_(capped_RV, lse_R, labels_R, row_scale_R, 0, vocab_size, spec)
        if gradient_RV.data_ptr() != logits_RV.data_ptr():
            logits_RV.copy_(gradient_RV)
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
    gradient_RC = _gradient_from_capped_(
        _capped_fp32(logits_RC, spec), lse_R, labels_R, row_scale_R, col_start, vocab_size, spec
    )
    if gradient_RC.data_ptr() != logits_RC.data_ptr():
        logits_RC.copy_(gradient_RC)
