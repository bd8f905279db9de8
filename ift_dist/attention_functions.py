"""The attention functions registered with transformers for packed rows: each computes causal attention that stays
inside the sample boundaries carried by PackedSegments. Which one runs, and on which model, is decided in
ift_dist.attention; these functions only refuse calls they cannot serve faithfully."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

# The names registered in transformers' AttentionInterface. They avoid the substrings "flash", "sdpa" and "flex"
# because transformers routes implementations by substring (`"flash" in name` loads flash-attn kernels,
# `"sdpa" in name` runs the sdpa dispatch checks), which must not happen to ours.
REGISTERED_NAMES = {
    "flash_attn": "ift_packed_fa_varlen",
    "torch_varlen": "ift_packed_torch_varlen",
    "flex": "ift_packed_docmask",
    "sdpa": "ift_packed_dense",
    "eager": "ift_packed_eager",
}


class PackedAttentionError(ValueError):
    """A model, backend or call that could let the samples of a packed row attend to each other."""


@dataclass(eq=False)
class PackedSegments:
    """The sample boundaries of one micro batch, in the forms the kernels take. Made fresh for every forward pass
    by `packed_forward_kwargs`; it caches the masks it builds so all layers (and checkpoint recomputation) share
    them, and counts the attention calls that saw it."""

    backend: str
    document_ids: torch.Tensor  # [B, T] sample index of every token; a row's padding tail is one more segment
    cu_seqlens: torch.Tensor  # [S + 1] int32 boundaries over the flattened B * T tokens
    max_seqlen: int  # longest segment, padding tails included
    calls: int = 0  # attention calls in the current forward pass (reset by the pre-forward hook)
    windows: list[int | None] = field(default_factory=list)  # sliding_window each of those calls received
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def dense_mask(self, sliding_window: int | None) -> torch.Tensor:
        """[B, 1, T, T] bool, True where the query (row) may attend to the key (column)."""
        key = ("dense", sliding_window)
        if key not in self.cache:
            positions = torch.arange(self.document_ids.shape[1], device=self.document_ids.device)
            distance_TT = positions[:, None] - positions[None, :]  # query index - key index
            allowed_TT = distance_TT >= 0
            if sliding_window is not None:
                # transformers' window: a query sees itself and the sliding_window - 1 tokens before it.
                allowed_TT = allowed_TT & (distance_TT < sliding_window)
            same_sample_BTT = self.document_ids[:, :, None] == self.document_ids[:, None, :]
            self.cache[key] = (same_sample_BTT & allowed_TT).unsqueeze(1)
        return self.cache[key]

    def additive_mask(self, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, T, T] in `dtype`: 0 where attention is allowed, the dtype's minimum elsewhere."""
        key = ("additive", sliding_window, dtype)
        if key not in self.cache:
            allowed = self.dense_mask(sliding_window)
            bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            self.cache[key] = bias.masked_fill(~allowed, torch.finfo(dtype).min)
        return self.cache[key]

    def block_mask(self, sliding_window: int | None) -> Any:
        """FlexAttention BlockMask: causal, same sample, optional window."""
        key = ("block", sliding_window)
        if key not in self.cache:
            from torch.nn.attention.flex_attention import create_block_mask

            document_ids = self.document_ids

            def mask_mod(batch_index, head_index, query_index, key_index):
                allowed = (query_index >= key_index) & (
                    document_ids[batch_index, query_index] == document_ids[batch_index, key_index]
                )
                if sliding_window is not None:
                    allowed = allowed & (query_index - key_index < sliding_window)
                return allowed

            batch_size, total = document_ids.shape
            self.cache[key] = create_block_mask(
                mask_mod, batch_size, None, total, total, device=document_ids.device
            )
        return self.cache[key]


def register_attention_functions() -> dict[str, str]:
    """Register our functions with transformers (idempotent); returns backend -> registered name."""
    from transformers import AttentionInterface

    functions = {
        "flash_attn": _flash_attn_forward,
        "torch_varlen": _torch_varlen_forward,
        "flex": _flex_forward,
        "sdpa": _sdpa_forward,
        "eager": _eager_forward,
    }
    for backend, function in functions.items():
        AttentionInterface.register(REGISTERED_NAMES[backend], function)
    return dict(REGISTERED_NAMES)


def _segments_for(backend, module, query, key, attention_mask, dropout, kwargs) -> PackedSegments:
    """The boundaries of this call, after refusing what this module cannot do with them."""
    segments = kwargs.get("packed_segments")
    if segments is None:
        raise PackedAttentionError(
            f"packed attention ({backend}) was called without packed_segments: build the model call with "
            "ift_dist.attention.packed_forward_kwargs, or set a stock implementation for unpacked use "
            '(model.set_attn_implementation("sdpa"))'
        )
    if segments.backend != backend:
        raise PackedAttentionError(
            f"packed_segments were built for {segments.backend}, the model runs {backend}"
        )
    if attention_mask is not None:
        raise PackedAttentionError("packed attention takes its mask from packed_segments, not attention_mask")
    if kwargs.get("s_aux") is not None:
        raise PackedAttentionError(
            f"{type(module).__name__} uses attention sinks, which packed attention lacks"
        )
    if kwargs.get("position_bias") is not None:
        raise PackedAttentionError(
            f"{type(module).__name__} adds a position bias, which packed attention lacks"
        )
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise PackedAttentionError(f"{type(module).__name__} is not causal; packed attention is causal only")
    if query.shape[2] != key.shape[2] or tuple(query.shape[::2]) != tuple(segments.document_ids.shape):
        raise PackedAttentionError(
            f"query {tuple(query.shape)} / key {tuple(key.shape)} do not match the packed rows "
            f"{tuple(segments.document_ids.shape)} (a KV cache cannot be used with packed rows)"
        )
    if dropout and backend in ("torch_varlen", "flex"):
        raise PackedAttentionError(f"the {backend} backend has no attention dropout; set it to 0 or use sdpa")
    segments.calls += 1
    segments.windows.append(kwargs.get("sliding_window"))
    return segments


def _repeat_kv(states_BHTD: torch.Tensor, groups: int) -> torch.Tensor:
    return states_BHTD if groups == 1 else states_BHTD.repeat_interleave(groups, dim=1)


def _sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    segments = _segments_for("sdpa", module, query, key, attention_mask, dropout, kwargs)
    if kwargs.get("softcap") is not None:
        raise PackedAttentionError(
            "the sdpa backend cannot cap attention logits (softcap); use eager or flex"
        )
    groups = query.shape[1] // key.shape[1]
    out_BHTD = F.scaled_dot_product_attention(
        query,
        _repeat_kv(key, groups),
        _repeat_kv(value, groups),
        attn_mask=segments.dense_mask(kwargs.get("sliding_window")),
        dropout_p=dropout,
        scale=scaling,
    )
    return out_BHTD.transpose(1, 2).contiguous(), None


def _eager_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs
):
    segments = _segments_for("eager", module, query, key, attention_mask, dropout, kwargs)
    groups = query.shape[1] // key.shape[1]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores_BHTT = torch.matmul(query, _repeat_kv(key, groups).transpose(2, 3)) * scaling
    if softcap is not None:
        scores_BHTT = torch.tanh(scores_BHTT / softcap) * softcap
    scores_BHTT = scores_BHTT + segments.additive_mask(kwargs.get("sliding_window"), scores_BHTT.dtype)
    weights_BHTT = torch.softmax(scores_BHTT, dim=-1, dtype=torch.float32).to(query.dtype)
    weights_BHTT = F.dropout(weights_BHTT, p=dropout, training=module.training)
    out_BHTD = torch.matmul(weights_BHTT, _repeat_kv(value, groups))
    return out_BHTD.transpose(1, 2).contiguous(), weights_BHTT


_compiled_flex_attention = None


def _flex_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs
):
    global _compiled_flex_attention
    from torch.nn.attention.flex_attention import flex_attention

    segments = _segments_for("flex", module, query, key, attention_mask, dropout, kwargs)
    block_mask = segments.block_mask(kwargs.get("sliding_window"))
    score_mod = None
    if softcap is not None:

        def score_mod(score, batch_index, head_index, query_index, key_index):
            return torch.tanh(score / softcap) * softcap

    if query.device.type == "cpu":
        # Unfused reference path: CPU FlexAttention is forward-only and compiling it costs minutes on a small box.
        function = flex_attention
    else:
        if _compiled_flex_attention is None:
            _compiled_flex_attention = torch.compile(flex_attention)
        function = _compiled_flex_attention
    gqa = query.shape[1] != key.shape[1]
    out_BHTD = function(
        query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=gqa
    )
    return out_BHTD.transpose(1, 2).contiguous(), None


def _flatten(states_BHTD: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B * T, H, D], the token-major layout of the varlen kernels."""
    return states_BHTD.transpose(1, 2).reshape(-1, states_BHTD.shape[1], states_BHTD.shape[3])


def _flash_attn_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs
):
    from flash_attn import flash_attn_varlen_func

    segments = _segments_for("flash_attn", module, query, key, attention_mask, dropout, kwargs)
    window = kwargs.get("sliding_window")
    out_ND = flash_attn_varlen_func(
        _flatten(query),
        _flatten(key),  # fewer key/value heads (GQA) are fine for flash-attn
        _flatten(value),
        cu_seqlens_q=segments.cu_seqlens,
        cu_seqlens_k=segments.cu_seqlens,
        max_seqlen_q=segments.max_seqlen,
        max_seqlen_k=segments.max_seqlen,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
        window_size=(window - 1, 0) if window is not None else (-1, -1),
        softcap=softcap if softcap is not None else 0.0,
    )
    return out_ND.view(query.shape[0], query.shape[2], *out_ND.shape[1:]), None


def _torch_varlen_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from torch.nn.attention.varlen import varlen_attn

    segments = _segments_for("torch_varlen", module, query, key, attention_mask, dropout, kwargs)
    if kwargs.get("softcap") is not None:
        raise PackedAttentionError("the torch_varlen backend cannot cap attention logits (softcap)")
    window = kwargs.get("sliding_window")
    # The signature changed between torch releases: adapt to what this one takes, refuse what it cannot do.
    parameters = inspect.signature(varlen_attn).parameters
    options: dict[str, Any] = {}
    if "scale" in parameters:
        options["scale"] = scaling
    elif scaling is not None and abs(scaling - query.shape[-1] ** -0.5) > 1e-12:
        raise PackedAttentionError(
            f"torch {torch.__version__} varlen_attn has no scale; the model needs {scaling}"
        )
    if "window_size" in parameters:  # newer torch: causality is the window (-1, 0)
        options["window_size"] = (window - 1, 0) if window is not None else (-1, 0)
    elif window is not None:
        raise PackedAttentionError(f"torch {torch.__version__} varlen_attn has no sliding window")
    else:
        options["is_causal"] = True
    groups = query.shape[1] // key.shape[1]
    if "enable_gqa" in parameters:
        options["enable_gqa"] = groups > 1
    else:
        key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    out_ND = varlen_attn(
        _flatten(query),
        _flatten(key),
        _flatten(value),
        segments.cu_seqlens,
        segments.cu_seqlens,
        segments.max_seqlen,
        segments.max_seqlen,
        **options,
    )
    return out_ND.view(query.shape[0], query.shape[2], *out_ND.shape[1:]), None
