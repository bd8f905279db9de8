"""The training loss of a causal LM on packed rows: cross-entropy summed over supervised tokens (fused kernel or
reference path), normalised by the supervised tokens of the whole optimizer step.

Labels follow the Hugging Face convention (ift_dist.data.contracts): the hidden state at position t predicts labels[t + 1].
The first label of every packed sample is IGNORE_INDEX, so no position is trained across a sample boundary.

    fused      base model -> hidden [B, T, H] -> LinearLossHead: fused linear cross-entropy over the supervised
               positions only, with the output-embedding weight; the [B, T, V] logits never exist.
    reference  the whole HF model -> logits [B, T, V] -> torch cross-entropy: the executable specification.

Normalisation (docs/training.md): the step loss is sum(token losses) / N, N = supervised tokens of every micro batch
of the step on every rank, counted (one all-reduce) before the first backward; `deepspeed_backward_loss` is the one
place that compensates for what DeepSpeed divides by.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ift_dist.config import LossMode
from ift_dist.data.contracts import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Config attributes of models whose forward rescales the logits after lm_head (Cohere logit_scale, Granite
# logits_scaling, MiniCPM dim_model_base): the fused path does not know the factor and refuses such a model.
LOGIT_SCALING_ATTRIBUTES = ("logit_scale", "logits_scaling", "dim_model_base")


def shift_labels(labels_BT: torch.Tensor) -> torch.Tensor:
    """targets[b, t] = labels[b, t + 1], IGNORE_INDEX at the end: the label each position predicts."""
    ignore_B1 = torch.full_like(labels_BT[:, :1], IGNORE_INDEX)
    return torch.cat([labels_BT[:, 1:], ignore_B1], dim=1)


def reference_cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Sum of the token cross-entropies (fp32) over supervised targets; the full logits are materialised."""
    return F.cross_entropy(
        logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def deepspeed_backward_loss(
    loss_sum: torch.Tensor, step_tokens: int, world_size: int, accumulation_steps: int
) -> torch.Tensor:
    """What to pass to DeepSpeed's backward for one micro batch, so that the applied gradient is that of the step
    loss. The one place that compensates for DeepSpeed's own scaling.

    Wanted: the gradient of  L = (sum over ranks r and micro batches m of loss_sum[r, m]) / N,  N = step_tokens,
    the supervised tokens of the whole step (all ranks, all micro batches).
    DeepSpeed applies:  g = (1 / W) sum_r (1 / A) sum_m d x[r, m]   for the x[r, m] handed to engine.backward:
    backward divides x by the A = accumulation_steps (scale_wrt_gas), and the ZeRO gradient reduce-scatter averages
    over the W = world_size data-parallel ranks.
    So  x[r, m] = loss_sum[r, m] x W x A / N  gives  g = sum_r sum_m d loss_sum[r, m] / N = dL  exactly.
    A step without any supervised token (N = 0) has a zero loss and zero gradients."""
    return loss_sum * (world_size * accumulation_steps / max(step_tokens, 1))


def logit_softcap(model: Any) -> float | None:
    """The final logit soft-capping of Gemma-2-style models (None for most)."""
    config = model.config.get_text_config()
    return getattr(config, "final_logit_softcapping", None)


def check_fused_supported(model: Any) -> None:
    """Refuse models whose logits are not hidden @ W.T (+ b) (up to soft-capping): use train.loss=reference."""
    config = model.config.get_text_config()
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"train.loss=fused: {type(model).__name__} has no output embedding; use reference")
    for name in LOGIT_SCALING_ATTRIBUTES:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(
                f"train.loss=fused: {type(model).__name__} rescales its logits (config.{name}="
                f"{getattr(config, name)!r}), which the fused loss does not do; use train.loss=reference"
            )


class LinearLossHead(nn.Module):
    """Fused linear cross-entropy through the output embedding, as a module of its own.

    It registers the very Parameter of lm_head (of embed_tokens too, when the embeddings are tied), so under ZeRO-3
    DeepSpeed's module hooks gather that weight around this module's forward and again before its backward, and
    reduce its gradient like any other: the one place the fused loss reads the weight, no patched HF module."""

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None = None,
        softcap: float | None = None,
        weight_grad_pass: str = "auto",
    ):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.softcap = softcap
        # How the kernel accumulates dW (train.fused_loss_dw; ift_dist/kernels/options.py ChunkPlan).
        self.weight_grad_pass = weight_grad_pass

    def forward(self, hidden_NH: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
        from ift_dist.kernels.linear_cross_entropy import fused_linear_cross_entropy

        return fused_linear_cross_entropy(
            hidden_NH,
            self.weight,
            targets_N,
            bias=self.bias,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            logit_softcap=self.softcap,
            weight_grad_pass=self.weight_grad_pass,
        )


class CausalLMLoss(nn.Module):
    """The module DeepSpeed trains: the HF model plus the loss, so one call is one micro batch's summed loss.

    forward(labels=[B, T], **model_kwargs) -> fp32 scalar, the sum of the supervised token losses of the batch.
    model_kwargs are those of `attention.packed_forward_kwargs`. The HF model stays reachable as `.model` (for
    generation and export); nothing in it is patched."""

    def __init__(self, model: Any, mode: LossMode = LossMode.fused, weight_grad_pass: str = "auto"):
        super().__init__()
        self.model = model
        self.mode = LossMode(mode)
        if self.mode == LossMode.fused:
            check_fused_supported(model)
            output = model.get_output_embeddings()
            self.head = LinearLossHead(
                output.weight, getattr(output, "bias", None), logit_softcap(model), weight_grad_pass
            )

    def forward(self, labels: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        targets_BT = shift_labels(labels)
        if self.mode == LossMode.fused:
            hidden_BTH = self.model.base_model(**model_kwargs).last_hidden_state
            return self.head(hidden_BTH.flatten(0, 1), targets_BT.flatten())
        logits_BTV = self.model(**model_kwargs).logits
        return reference_cross_entropy(logits_BTV, targets_BT)
