"""The chunked linear cross-entropy algorithm as one autograd Function; per-chunk math comes from a logits backend.

Never holds the [N, V] logits. Ignored tokens are dropped before any matmul, then:

  row pass    for chunks of supervised rows: logits [R, V] = X_R W^T (+ b); the backend turns them into lse, loss,
              and (when gradients are wanted) dLoss/dlogits in place; dX_R = dlogits @ W is one matmul reducing over
              the whole vocabulary, so dX is accumulated in fp32 inside the matmul and rounded once.
  dW, "rows"  accumulated over the row chunks in fp32: into the gradient itself for an fp32 weight, else into an
              fp32 [V, H] buffer.
  dW, "rows_inplace"  accumulated over the row chunks straight into the gradient in the weight's dtype: each chunk's
              product is summed in fp32 inside one matmul and rounded into the running sum once per chunk (3 matmuls,
              no [V, H] buffer; for bf16, one rounding per row chunk).
  dW, "vocab" (default for bf16/fp16) for chunks of vocabulary columns: logits [M, C] of all supervised tokens are
              recomputed, turned into dlogits with the lse of the row pass, and dW_C = dlogits^T @ X is one matmul
              reducing over every token: fp32 accumulation without any [V, H] fp32 buffer, at the cost of one more
              logits matmul.

For the "sum" and "mean" reductions the gradients are computed during the forward pass (the backward only scales
them by the incoming gradient), so the weight is needed once (one ZeRO-3 gather) and nothing large is saved. For
"none" the per-token incoming gradient is only known in backward: the forward saves the inputs and the lse, and the
backward runs the passes with each row scaled by its incoming gradient.
"""

from __future__ import annotations

import dataclasses

import torch

from . import torch_logits
from .options import ChunkPlan, LossSpec, chunk_sizes


@dataclasses.dataclass
class Supervised:
    """The supervised tokens of one call, ready for the passes."""

    hidden_NH: torch.Tensor  # the input, all N tokens
    labels_M: torch.Tensor
    rows_M: torch.Tensor | None  # positions in the input; None when every token is supervised
    num_tokens: int  # N, supervised or not

    @property
    def count(self) -> int:
        return self.labels_M.shape[0]

    def hidden_rows(self, start: int, end: int) -> torch.Tensor:
        """Supervised hidden states start..end [R, H]: a view, or a gathered chunk-sized copy. The row pass gathers
        chunk by chunk, so the row strategies never hold a copy of all M supervised rows."""
        if self.rows_M is None:
            return self.hidden_NH[start:end]
        return self.hidden_NH.index_select(0, self.rows_M[start:end])


def select_supervised(
    hidden_NH: torch.Tensor, labels_N: torch.Tensor, ignore_index: int, vocab_size: int
) -> Supervised:
    """Drops ignored tokens (one host sync: the number of supervised tokens sets every shape that follows)."""
    rows_M = torch.nonzero(labels_N != ignore_index).squeeze(1)
    num_tokens = labels_N.shape[0]
    if rows_M.numel() == num_tokens:
        supervised = Supervised(hidden_NH, labels_N, None, num_tokens)
    else:
        supervised = Supervised(hidden_NH, labels_N.index_select(0, rows_M), rows_M, num_tokens)
    labels_M = supervised.labels_M
    if labels_M.numel() and bool(((labels_M < 0) | (labels_M >= vocab_size)).any()):
        bad = labels_M[(labels_M < 0) | (labels_M >= vocab_size)][:5].tolist()
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; found {bad}"
        )
    return supervised


def _backend(plan: ChunkPlan):
    if plan.backend == "triton":
        from . import triton_logits  # imported here so the torch path works where triton does not import

        return triton_logits
    return torch_logits


def _logits(hidden_RH: torch.Tensor, weight_CH: torch.Tensor, bias_C: torch.Tensor | None) -> torch.Tensor:
    if bias_C is None:
        return hidden_RH @ weight_CH.T
    return torch.addmm(bias_C, hidden_RH, weight_CH.T)


def _accumulate_(gradient: torch.Tensor, left: torch.Tensor, right: torch.Tensor, first: bool) -> None:
    """gradient (weight dtype) = or += left @ right: the product is summed in fp32 inside the matmul and the sum with
    the gradient is rounded to its dtype once (cuBLAS: fp32 compute type, beta=1 applied in the fp32 epilogue; CPU:
    the same with an fp32 accumulator per output element)."""
    if first:
        # Writing the first product saves zero-filling the whole [V, H] gradient and reading those zeros back.
        torch.mm(left, right, out=gradient)
    else:
        # The out= form of addmm_ (what torch's flop counter sees; tests count matmuls).
        torch.addmm(gradient, left, right, out=gradient)


def resolve_weight_grad_pass(weight_grad_pass: str, dtype: torch.dtype) -> str:
    """The dW strategy actually run: "auto" is "rows" for an fp32 weight, "vocab" otherwise, and "rows_inplace" on
    an fp32 weight is "rows" (the gradient is its own fp32 accumulator)."""
    if weight_grad_pass == "auto":
        return "rows" if dtype == torch.float32 else "vocab"
    if weight_grad_pass == "rows_inplace" and dtype == torch.float32:
        return "rows"
    return weight_grad_pass


def _addmm_fp32_(accumulator: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """accumulator (fp32) += left @ right for bf16/fp16 operands, accumulating in fp32 ("rows" with a low-precision
    weight; an fp32 weight is accumulated in place by `_accumulate_`)."""
    if left.is_cuda:
        try:
            # cuBLAS reads bf16/fp16 and accumulates into the fp32 output (aten::addmm.dtype_out).
            torch.addmm(accumulator, left, right, out_dtype=torch.float32, out=accumulator)
            return
        except (RuntimeError, TypeError):
            pass
    # The out= form of addmm_ (what torch's flop counter sees; tests count matmuls).
    torch.addmm(accumulator, left.float(), right.float(), out=accumulator)


@dataclasses.dataclass
class Gradients:
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def run_passes(
    supervised: Supervised,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    spec: LossSpec,
    plan: ChunkPlan,
    row_scale_M: torch.Tensor,
    needs: tuple[bool, bool, bool],
    lse_M: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, Gradients]:
    """Runs the row pass and, when needed, the vocabulary pass.

    Without `lse_M` the row pass computes the statistics, returned as (lse, loss, z-loss part) per supervised token;
    with it (backward of "none") only gradients are computed. `needs` says which of (hidden, weight, bias) get a
    gradient; each supervised row's gradient is multiplied by `row_scale_M`."""
    backend = _backend(plan)
    hidden_NH, labels_M = supervised.hidden_NH, supervised.labels_M
    tokens, hidden_size = supervised.count, hidden_NH.shape[1]
    vocab_size = weight_VH.shape[0]
    rows_per_chunk, columns_per_chunk = chunk_sizes(plan, tokens, hidden_size, vocab_size)
    need_hidden, need_weight, need_bias = needs
    weight_pass = resolve_weight_grad_pass(plan.weight_grad_pass, weight_VH.dtype)
    rows_mode = weight_pass != "vocab"
    # An fp32 weight is its own fp32 accumulator; "rows_inplace" accepts one rounding per chunk in a lower dtype.
    weight_in_place = rows_mode and (weight_pass == "rows_inplace" or weight_VH.dtype == torch.float32)

    grads = Gradients()
    if need_hidden:
        # Every row is written by the row pass when every token is supervised; else the ignored rows stay 0.
        allocate = torch.empty if supervised.rows_M is None else torch.zeros
        grads.hidden = allocate(
            (supervised.num_tokens, hidden_size), dtype=hidden_NH.dtype, device=hidden_NH.device
        )
    weight_accumulator = bias_accumulator = None
    if need_weight:
        if rows_mode and not weight_in_place:
            weight_accumulator = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device)
        else:
            # Written by the first row chunk, or row by row by the vocabulary pass; zeroed below if neither runs.
            grads.weight = torch.empty_like(weight_VH)
    if need_bias:
        bias_accumulator = torch.zeros(vocab_size, dtype=torch.float32, device=weight_VH.device)

    need_row_gradient = need_hidden or (rows_mode and (need_weight or need_bias))
    stats = []
    if lse_M is None or need_row_gradient:
        for start in range(0, tokens, rows_per_chunk):
            end = min(tokens, start + rows_per_chunk)
            hidden_RH = supervised.hidden_rows(start, end)
            labels_R, scale_R = labels_M[start:end], row_scale_M[start:end]
            logits_RV = _logits(hidden_RH, weight_VH, bias_V)
            if lse_M is None:
                stats.append(backend.row_stats_(logits_RV, labels_R, scale_R, spec, need_row_gradient))
            else:
                backend.dlogits_(logits_RV, lse_M[start:end], labels_R, scale_R, 0, vocab_size, spec)
            if not need_row_gradient:
                continue
            # From here on logits_RV holds dLoss/dlogits.
            if need_hidden:
                if supervised.rows_M is None:
                    torch.mm(logits_RV, weight_VH, out=grads.hidden[start:end])
                else:
                    grads.hidden.index_copy_(0, supervised.rows_M[start:end], logits_RV @ weight_VH)
            if rows_mode and need_weight and weight_in_place:
                _accumulate_(grads.weight, logits_RV.T, hidden_RH, first=start == 0)
            elif rows_mode and need_weight:
                _addmm_fp32_(weight_accumulator, logits_RV.T, hidden_RH)
            if rows_mode and need_bias:
                bias_accumulator += logits_RV.sum(dim=0, dtype=torch.float32)
            del logits_RV
    if stats:
        lse_M = torch.cat([chunk[0] for chunk in stats])

    if not rows_mode and (need_weight or need_bias) and tokens:
        # Every supervised row is an operand of every vocabulary chunk: gathered once (M x H), after the row pass.
        hidden_MH = supervised.hidden_rows(0, tokens)
        for start in range(0, vocab_size, columns_per_chunk):
            end = min(vocab_size, start + columns_per_chunk)
            bias_C = None if bias_V is None else bias_V[start:end]
            logits_MC = _logits(hidden_MH, weight_VH[start:end], bias_C)
            backend.dlogits_(logits_MC, lse_M, labels_M, row_scale_M, start, vocab_size, spec)
            if need_weight:
                torch.mm(logits_MC.T, hidden_MH, out=grads.weight[start:end])
            if need_bias:
                bias_accumulator[start:end] = logits_MC.sum(dim=0, dtype=torch.float32)
            del logits_MC
    if need_weight and weight_accumulator is None and not tokens:
        grads.weight.zero_()  # no chunk ran to write it

    if weight_accumulator is not None:
        grads.weight = (
            weight_accumulator if weight_VH.dtype == torch.float32 else weight_accumulator.to(weight_VH.dtype)
        )
    if bias_accumulator is not None:
        grads.bias = bias_accumulator.to(bias_V.dtype)
    if not stats:
        return None, grads
    return (lse_M, torch.cat([chunk[1] for chunk in stats]), torch.cat([chunk[2] for chunk in stats])), grads


def _scatter_tokens(values_M: torch.Tensor, supervised: Supervised) -> torch.Tensor:
    """Per-token values [N], 0 at ignored tokens."""
    if supervised.rows_M is None:
        return values_M
    values_N = values_M.new_zeros(supervised.num_tokens)
    return values_N.index_copy_(0, supervised.rows_M, values_M)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of `run_passes`; returns (loss, z-loss part), the latter not differentiable."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, labels_N, spec: LossSpec, plan: ChunkPlan, needs):
        # Autocast would recast the chunk matmuls behind the backend's back; the inputs' own dtype is the contract.
        with torch.autocast(hidden_NH.device.type, enabled=False):
            return LinearCrossEntropyFunction._forward(
                ctx, hidden_NH, weight_VH, bias_V, labels_N, spec, plan, needs
            )

    @staticmethod
    def backward(ctx, grad_loss, _grad_z_part):
        with torch.autocast(grad_loss.device.type, enabled=False):
            return LinearCrossEntropyFunction._backward(ctx, grad_loss)

    @staticmethod
    def _forward(ctx, hidden_NH, weight_VH, bias_V, labels_N, spec: LossSpec, plan: ChunkPlan, needs):
        supervised = select_supervised(hidden_NH, labels_N, spec.ignore_index, weight_VH.shape[0])
        tokens = supervised.count
        ctx.spec, ctx.plan, ctx.needs, ctx.num_tokens = spec, plan, needs, supervised.num_tokens
        scalar_grads = spec.reduction != "none" and any(needs)
        scale = 1.0 / tokens if spec.reduction == "mean" and tokens else 1.0
        row_scale_M = torch.full((tokens,), scale, dtype=torch.float32, device=hidden_NH.device)
        stats, grads = run_passes(
            supervised, weight_VH, bias_V, spec, plan, row_scale_M, needs if scalar_grads else (False,) * 3
        )
        # No supervised token at all: empty statistics, so the loss is 0 and every gradient is 0.
        lse_M, loss_M, z_loss_M = stats if stats is not None else (row_scale_M,) * 3

        if spec.reduction == "none":
            ctx.save_for_backward(
                supervised.hidden_NH,
                supervised.labels_M,
                supervised.rows_M,
                weight_VH,
                bias_V,
                lse_M,
            )
            loss, z_part = _scatter_tokens(loss_M, supervised), _scatter_tokens(z_loss_M, supervised)
        else:
            ctx.grads = grads
            loss, z_part = loss_M.sum() * scale, z_loss_M.sum() * scale
        ctx.mark_non_differentiable(z_part)
        return loss, z_part

    @staticmethod
    def _backward(ctx, grad_loss):
        if ctx.spec.reduction != "none":
            grads = ctx.grads
            if grads is None:
                raise RuntimeError(
                    "fused_linear_cross_entropy computes its gradients in the forward pass and releases them in the "
                    "first backward; a second backward through the same graph is not supported"
                )
            ctx.grads = None
            # Scaling in place saves a gradient-sized copy; the usual incoming gradient is exactly 1 (one sync).
            if not bool(grad_loss == 1.0):
                for gradient in (grads.hidden, grads.weight, grads.bias):
                    if gradient is not None:
                        gradient.mul_(grad_loss.to(gradient.dtype))
            return grads.hidden, grads.weight, grads.bias, None, None, None, None

        hidden_NH, labels_M, rows_M, weight_VH, bias_V, lse_M = ctx.saved_tensors
        supervised = Supervised(hidden_NH, labels_M, rows_M, ctx.num_tokens)
        row_scale_M = grad_loss.float() if rows_M is None else grad_loss.float().index_select(0, rows_M)
        _, grads = run_passes(
            supervised, weight_VH, bias_V, ctx.spec, ctx.plan, row_scale_M, ctx.needs, lse_M
        )
        return grads.hidden, grads.weight, grads.bias, None, None, None, None
