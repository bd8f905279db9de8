"""The frozen description of one fused loss call: what to compute (LossSpec) and how to schedule it (ChunkPlan)."""

from __future__ import annotations

import dataclasses

REDUCTIONS = ("sum", "mean", "none")
IMPLEMENTATIONS = ("auto", "triton", "torch")
WEIGHT_GRAD_PASSES = ("auto", "vocab", "rows", "rows_inplace")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The loss semantics, exactly as `reference.py` defines them."""

    ignore_index: int = -100
    reduction: str = "sum"  # "sum" | "mean" (over supervised tokens) | "none" (per token)
    label_smoothing: float = 0.0  # eps in [0, 1]: weight of the uniform distribution over the V classes
    z_loss: float = 0.0  # coefficient of lse^2 per supervised token (PaLM); 0 disables it
    logit_softcap: float | None = (
        None  # cap > 0: logits -> cap * tanh(logits / cap) (Gemma-2); None disables it
    )

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if self.z_loss < 0.0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")
        if self.logit_softcap is not None and not self.logit_softcap > 0.0:
            raise ValueError(f"logit_softcap must be > 0 or None, got {self.logit_softcap}")


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """How the work is cut: which per-chunk backend, how large a logits chunk may be, how dW is accumulated.

    weight_grad_pass:
      "rows"  — dW accumulates over row chunks in fp32: directly into the weight gradient when the weight is fp32
                (no extra memory, 3 matmuls), else in an fp32 [V, H] buffer (2 bytes/param more than the gradient).
      "vocab" — after the row pass (loss, logsumexp, dX), a second pass over vocabulary chunks recomputes the
                logits of all supervised tokens for each chunk and computes its dW rows in one matmul that
                reduces over every token (fp32 accumulation inside the matmul, no [V, H] buffer, 4 matmuls).
      "rows_inplace" — dW accumulates over row chunks straight into the gradient in the weight's dtype: each row
                chunk's dW_R = dlogits_R^T @ X_R is computed in fp32 inside one matmul and added to the running sum,
                which is rounded to the weight dtype once per chunk (addmm with beta=1, as Liger does). 3 matmuls and no
                [V, H] buffer; for bf16 the price is one rounding per row chunk (error grows with the number of chunks,
                not with the number of tokens) and a read-modify-write of the whole gradient per chunk. Equal to
                "rows" for an fp32 weight.
      "auto"  — "rows" for an fp32 weight, "vocab" otherwise.
    """

    backend: str  # "torch" | "triton"
    weight_grad_pass: str = "auto"
    # Upper bound on the elements of one logits chunk ([rows, V] in the row pass, [tokens, columns] in the vocabulary
    # pass). None: half the elements of the supervised hidden states, so the chunk costs at most about as many bytes
    # as the hidden states in the input dtype hold (Liger's choice is 1-2x); see docs/kernels.md "Memory model".
    chunk_elements: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {self.backend!r}")
        if self.weight_grad_pass not in WEIGHT_GRAD_PASSES:
            raise ValueError(
                f"weight_grad_pass must be one of {WEIGHT_GRAD_PASSES}, got {self.weight_grad_pass!r}"
            )
        if self.chunk_elements is not None and self.chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1 or None, got {self.chunk_elements}")


# Floors keep default chunks large enough for the matmuls to stay efficient; an explicit budget is taken as given.
MIN_CHUNK_ROWS = 16
MIN_CHUNK_COLUMNS = 128
MIN_CHUNK_ELEMENTS = 1 << 20


def default_chunk_elements(tokens: int, hidden_size: int) -> int:
    """The default logits-chunk budget for `tokens` supervised tokens: half the elements of their hidden states."""
    return max(MIN_CHUNK_ELEMENTS, max(tokens, 1) * hidden_size // 2)


def chunk_sizes(plan: ChunkPlan, tokens: int, hidden_size: int, vocab_size: int) -> tuple[int, int]:
    """(rows per row-pass chunk, vocabulary columns per vocabulary-pass chunk) for `tokens` supervised tokens."""
    tokens = max(tokens, 1)
    if plan.chunk_elements is None:
        budget = default_chunk_elements(tokens, hidden_size)
        # Multiples of 64 fill the matmul tiles (a 130-row chunk would run a nearly empty second row of tiles) and
        # keep each weight slice aligned.
        rows = budget // vocab_size
        rows = max(MIN_CHUNK_ROWS, rows // 64 * 64 if rows >= 64 else rows)
        columns = max(MIN_CHUNK_COLUMNS, budget // tokens // 64 * 64)
    else:
        rows = max(1, plan.chunk_elements // vocab_size)
        columns = max(1, plan.chunk_elements // tokens)
    return min(rows, tokens), min(columns, vocab_size)
