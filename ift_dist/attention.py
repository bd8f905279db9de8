"""Packed-row attention: the one place that decides how each row's sample boundaries reach the attention kernel.

A packed row holds several samples end to end; a token may attend only to earlier tokens of its own sample. The
boundaries travel explicitly, never guessed from position_ids: `packed_forward_kwargs` turns a PackedBatch into the
model call's kwargs, one of which (`packed_segments`) carries them down through transformers' layers to our
attention functions (ift_dist.attention_functions), registered through transformers' public AttentionInterface:

    flash_attn    flash-attn's varlen kernel over cu_seqlens                          (CUDA, fp16/bf16)
    torch_varlen  torch.nn.attention.varlen.varlen_attn over cu_seqlens               (CUDA, fp16/bf16)
    flex          FlexAttention with a document BlockMask                   (CUDA; CPU forward only)
    sdpa          scaled_dot_product_attention with a block-diagonal causal mask
    eager         matmul + softmax with the same mask as an additive bias (supports logit softcapping)

With one of these set, transformers builds no mask of its own (create_causal_mask returns None for names it does not
know), so nothing else can widen or narrow what a token sees. A model or backend that cannot keep samples apart is
refused with PackedAttentionError, before training (`select_backend`) or at the first forward pass (the call counter
checked by the hooks that `enable_packed_attention` installs).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from ift_dist.attention_functions import (
    REGISTERED_NAMES,
    PackedAttentionError,
    PackedSegments,
    register_attention_functions,
)
from ift_dist.config import AttentionBackend

__all__ = [
    "BACKENDS",
    "REGISTERED_NAMES",
    "PackedAttentionError",
    "PackedSegments",
    "backend_available",
    "check_model",
    "enable_packed_attention",
    "packed_forward_kwargs",
    "select_backend",
]

logger = logging.getLogger(__name__)

# The backends a packed row can run on ("auto" of model.attention picks one of them).
BACKENDS = tuple(backend.value for backend in AttentionBackend if backend is not AttentionBackend.auto)

# Layer kinds whose attention is a causal softmax over the row; anything else (linear attention, Mamba, convolution,
# chunked or bidirectional attention) carries state or patterns across sample boundaries that no mask here removes.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


# ------------------------------------------------------------------------------------------------ building kwargs


def packed_forward_kwargs(batch: Any, backend: str, device: Any = None) -> dict[str, Any]:
    """The kwargs of `model(**kwargs)` for one PackedBatch, on `device` (default: where input_ids are):
    input_ids, position_ids, use_cache=False and the boundaries (`packed_segments`). Labels stay out: the loss is
    computed outside the model."""
    if backend not in BACKENDS:
        raise PackedAttentionError(f"unknown attention backend {backend!r}; one of {', '.join(BACKENDS)}")
    input_ids = batch.input_ids
    device = input_ids.device if device is None else torch.device(device)
    batch_size, total = input_ids.shape
    if len(batch.seq_lens) != batch_size:
        raise ValueError(f"seq_lens has {len(batch.seq_lens)} rows, input_ids has {batch_size}")
    document_ids = torch.empty(batch_size, total, dtype=torch.int32)
    expected_positions = torch.zeros(batch_size, total, dtype=torch.long)
    longest = 0
    for row, lengths in enumerate(batch.seq_lens):
        if any(length < 1 for length in lengths) or sum(lengths) > total:
            raise ValueError(f"row {row}: sample lengths {lengths} do not fit a row of {total} tokens")
        start = 0
        for index, length in enumerate(lengths):
            document_ids[row, start : start + length] = index
            expected_positions[row, start : start + length] = torch.arange(length)
            start += length
        document_ids[row, start:] = len(lengths)  # the padding tail: its own segment, seen by nothing else
        longest = max([longest, total - start, *lengths])
    # The boundaries come from seq_lens; position_ids must agree with them or RoPE would see other positions than
    # the samples would have alone.
    if not torch.equal(batch.position_ids.cpu(), expected_positions):
        raise ValueError("position_ids do not restart at 0 at every sample start given by seq_lens")
    segments = PackedSegments(
        backend=backend,
        document_ids=document_ids.to(device),
        cu_seqlens=batch.cu_seqlens().to(device),
        max_seqlen=longest,
    )
    return {
        "input_ids": input_ids.to(device),
        "position_ids": batch.position_ids.to(device),
        "use_cache": False,
        "packed_segments": segments,
    }


# ------------------------------------------------------------------------------------------------ choosing


def backend_available(backend: str, device_type: str, dtype: torch.dtype, training: bool) -> str | None:
    """None if `backend` can run here, else the reason it cannot."""
    half = dtype in (torch.float16, torch.bfloat16)
    if backend == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash_attn package is not installed"
        if device_type != "cuda" or not half:
            return f"flash-attn needs CUDA and fp16/bf16 weights (have {device_type}, {dtype})"
    elif backend == "torch_varlen":
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen"
        if device_type != "cuda" or not half:
            return f"torch varlen attention needs CUDA and fp16/bf16 weights (have {device_type}, {dtype})"
    elif backend == "flex":
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return f"torch {torch.__version__} has no FlexAttention"
        if device_type == "cpu" and training:
            return f"FlexAttention has no backward pass on CPU (torch {torch.__version__})"
    elif backend not in ("sdpa", "eager"):
        return f"unknown attention backend {backend!r}; one of auto, {', '.join(BACKENDS)}"
    return None


def check_model(model: Any, backend: str) -> None:
    """Refuse a model whose attention cannot be given explicit sample boundaries by `backend`."""
    name = type(model).__name__
    config = model.config.get_text_config()
    if not getattr(type(model), "_supports_attention_backend", False):
        raise PackedAttentionError(
            f"{name} does not route its attention through transformers' AttentionInterface, so packed sample "
            "boundaries cannot reach its attention; train it with data.packing=false"
        )
    if getattr(config, "is_encoder_decoder", False) or not getattr(config, "is_causal", True):
        raise PackedAttentionError(f"{name} is not a causal decoder; packed attention is causal only")
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", None) == "alibi":
        raise PackedAttentionError(
            f"{name} uses ALiBi position biases, which packed attention does not build"
        )
    if getattr(config, "attention_chunk_size", None):
        raise PackedAttentionError(f"{name} uses chunked attention, which packed attention does not build")
    unsupported = sorted(set(getattr(config, "layer_types", None) or ()) - set(SUPPORTED_LAYER_TYPES))
    if unsupported:
        raise PackedAttentionError(
            f"{name} has layers of type {unsupported}: their state or pattern crosses sample boundaries; "
            "train it with data.packing=false"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None and backend in ("sdpa", "torch_varlen"):
        raise PackedAttentionError(
            f"{name} caps attention logits (attn_logit_softcapping), which the {backend} backend cannot do; "
            "use eager, flex or flash_attn"
        )


def select_backend(model: Any, requested: str = "auto", *, device: Any = None, training: bool = True) -> str:
    """The backend to use for `model` on `device` (default: where its parameters are): `requested` after checking
    it can run and keep samples apart, or for "auto" the fastest that can: flash_attn (CUDA, installed), then
    torch_varlen (CUDA), flex (CUDA), sdpa."""
    device_type = torch.device(device).type if device is not None else next(model.parameters()).device.type
    dtype = next(model.parameters()).dtype
    if requested == "auto":
        candidates = ("flash_attn", "torch_varlen", "flex", "sdpa") if device_type == "cuda" else ("sdpa",)
        backend = next(c for c in candidates if backend_available(c, device_type, dtype, training) is None)
    else:
        reason = backend_available(requested, device_type, dtype, training)
        if reason is not None:
            raise PackedAttentionError(f"attention backend {requested!r} cannot run here: {reason}")
        backend = str(requested)
    check_model(model, backend)

    logger.info("packed attention backend: %s (requested %s, %s, %s)", backend, requested, device_type, dtype)
    return backend


def enable_packed_attention(model: Any, backend: str) -> None:
    """Switch `model` to the registered function of `backend` and install the hooks that check, after every packed
    forward pass, that each attention layer saw the boundaries. For unpacked use afterwards (generation), call
    `model.set_attn_implementation("sdpa")`."""
    check_model(model, backend)
    name = register_attention_functions()[backend]
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers < 4.53
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        raise PackedAttentionError(
            f"{type(model).__name__} did not accept the attention implementation {name!r} "
            f"(it kept {model.config._attn_implementation!r}); its attention cannot see packed boundaries"
        )
    base = getattr(model, "base_model", model)
    if getattr(base, "_ift_packed_attention_hooks", None) is None:
        config = model.config.get_text_config()
        base._ift_packed_attention_hooks = (
            base.register_forward_pre_hook(_reset_calls, with_kwargs=True),
            base.register_forward_hook(_make_call_check(config), with_kwargs=True),
        )


def _reset_calls(module, args, kwargs):
    segments = kwargs.get("packed_segments")
    if segments is not None:
        segments.calls = 0
        segments.windows.clear()


def _make_call_check(config):
    layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * layers

    def check(module, args, kwargs, output):
        segments = kwargs.get("packed_segments")
        if segments is None:
            return
        if segments.calls != layers:
            raise PackedAttentionError(
                f"{segments.calls} of {layers} attention layers received the packed sample boundaries: the "
                f"model's attention implementation is {module.config._attn_implementation!r}, or some layers "
                "bypass transformers' AttentionInterface; samples would attend to each other"
            )
        for index, (kind, window) in enumerate(zip(layer_types, segments.windows)):
            if kind == "sliding_attention" and window is None:
                raise PackedAttentionError(
                    f"layer {index} is a sliding-window layer but its attention call carried no sliding_window"
                )

    return check
