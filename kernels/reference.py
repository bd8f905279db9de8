"""The executable specification of linear cross-entropy: full logits, plain torch, autograd for the gradients.

Every fused implementation in this package is tested against `reference_linear_cross_entropy`. The semantics, for
one supervised token with hidden state x, label y, vocabulary size V:

    z      = W x + b                                  raw logits            [V]
    s      = cap * tanh(z / cap)  if a cap is given   soft-capped logits    (Gemma-2), else s = z
    lse    = log sum_j exp(s_j)
    ce     = lse - (1 - eps) * s_y - (eps / V) * sum_j s_j      torch's F.cross_entropy label smoothing over V classes
    zl     = z_loss * lse^2                           PaLM's auxiliary z-loss
    loss   = ce + zl

Tokens whose label equals `ignore_index` contribute nothing (loss 0, gradient 0). Reductions: "sum" over supervised
tokens, "mean" = sum / number of supervised tokens (0 when there are none, where torch would give NaN), "none" = one
value per token (0 for ignored tokens). The matmul runs in the input dtype, as the model's lm_head would; everything
after it runs in fp32, and the losses come back in fp32.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("sum", "mean", "none")


def reference_linear_cross_entropy(
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Loss of hidden [N, H] through weight [V, H] (+ bias [V]) against labels [N]; see the module docstring.

    Returns the loss, or (loss, z-loss part) with `return_z_loss`; the z-loss part is already included in the loss,
    reduced the same way, and detached (it is for logging)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    vocab_size = weight.shape[0]
    logits_NV = torch.nn.functional.linear(hidden, weight, bias).float()
    if logit_softcap is not None:
        logits_NV = logit_softcap * torch.tanh(logits_NV / logit_softcap)
    supervised_N = labels != ignore_index
    safe_labels_N = torch.where(supervised_N, labels, torch.zeros_like(labels))

    lse_N = torch.logsumexp(logits_NV, dim=-1)
    target_logit_N = logits_NV.gather(1, safe_labels_N[:, None]).squeeze(1)
    mean_logit_N = logits_NV.sum(dim=-1) / vocab_size
    cross_entropy_N = lse_N - (1.0 - label_smoothing) * target_logit_N - label_smoothing * mean_logit_N
    z_loss_N = z_loss * lse_N.square()
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    loss_N = torch.where(supervised_N, cross_entropy_N + z_loss_N, zero)
    z_loss_N = torch.where(supervised_N, z_loss_N, zero).detach()

    if reduction == "none":
        loss, z_part = loss_N, z_loss_N
    else:
        loss, z_part = loss_N.sum(), z_loss_N.sum()
        if reduction == "mean":
            count = supervised_N.sum().clamp(min=1)
            loss, z_part = loss / count, z_part / count
    return (loss, z_part) if return_z_loss else loss
