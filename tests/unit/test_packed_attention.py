"""Packed == unpacked: a packed row gives the logits, loss and gradients of its samples run one by one.

Real architectures (Llama, Qwen2 with a sliding-window layer, Gemma2 with logit softcapping), random init, fp32 on
CPU, every backend that runs here (sdpa and eager: forward and backward; FlexAttention: forward, as torch has no CPU
backward for it). The reference is transformers' own stock attention on each sample alone, with no packing at all.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    Lfm2Config,
    Lfm2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ift_dist.attention import (
    PackedAttentionError,
    enable_packed_attention,
    packed_forward_kwargs,
    select_backend,
)
from ift_dist.data.contracts import IGNORE_INDEX, PackedBatch

VOCAB = 300
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
SMALL = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}

# One row of 3 samples + a padding tail; two rows (the second exactly full, no padding).
ONE_ROW = [[7, 11, 5]]
TWO_ROWS = [[7, 11, 5], [16, 12]]
ROW_LENGTH = 28


def build_model(arch: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL, **HEADS))
    elif arch == "qwen2":
        # Layer 1 uses a 4-token sliding window, so the window must survive packing too.
        config = Qwen2Config(**SMALL, **HEADS, use_sliding_window=True, sliding_window=4, max_window_layers=1)
        assert config.layer_types == ["full_attention", "sliding_attention"]
        model = Qwen2ForCausalLM(config)
    elif arch == "gemma2":
        config = Gemma2Config(**SMALL, **HEADS, head_dim=16, query_pre_attn_scalar=16, sliding_window=4)
        assert config.attn_logit_softcapping is not None
        model = Gemma2ForCausalLM(config)
    else:
        raise ValueError(arch)
    return model.to(device=device, dtype=dtype).train()


def reference_implementation(arch: str) -> str:
    # Stock sdpa cannot softcap, so Gemma2's own reference is transformers' eager attention.
    return "eager" if arch == "gemma2" else "sdpa"


def build_batch(rows: list[list[int]], seed: int = 1) -> tuple[PackedBatch, list[tuple[int, int, int]]]:
    """A PackedBatch as the loader makes it, and (row, start, length) of every sample."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(len(rows), ROW_LENGTH, dtype=torch.long)  # pad id 0
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    position_ids = torch.zeros_like(input_ids)
    spans = []
    for row, lengths in enumerate(rows):
        start = 0
        for length in lengths:
            ids = torch.randint(1, VOCAB, (length,), generator=generator)
            input_ids[row, start : start + length] = ids
            # Supervise the second half of each sample; the first label of a sample is always ignored.
            supervised = slice(start + max(1, length // 2), start + length)
            labels[row, supervised] = input_ids[row, supervised]
            position_ids[row, start : start + length] = torch.arange(length)
            spans.append((row, start, length))
            start += length
    return PackedBatch(input_ids, labels, position_ids, [list(r) for r in rows], [[] for _ in rows]), spans


def summed_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Cross entropy summed over supervised tokens, with the HF shift (position t predicts labels[t + 1])."""
    return F.cross_entropy(
        logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1]).float(),
        labels_BT[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def one_by_one(model, arch, batch, spans, *, backward: bool):
    """Each sample alone through the model's stock attention: logits per sample, total loss, gradients."""
    model.set_attn_implementation(reference_implementation(arch))
    model.zero_grad()
    logits, total = [], 0.0
    for row, start, length in spans:
        ids = batch.input_ids[row : row + 1, start : start + length]
        with torch.set_grad_enabled(backward):
            sample_logits = model(input_ids=ids, use_cache=False).logits
            loss = summed_loss(sample_logits, batch.labels[row : row + 1, start : start + length])
        if backward:
            loss.backward()
        logits.append(sample_logits[0].detach())
        total += loss.detach()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()} if backward else None
    return logits, total, grads


def packed(model, backend, batch, *, backward: bool):
    enable_packed_attention(model, backend)
    model.zero_grad()
    with torch.set_grad_enabled(backward):
        logits = model(**packed_forward_kwargs(batch, backend)).logits
        loss = summed_loss(logits, batch.labels)
    if backward:
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()} if backward else None
    return logits.detach(), loss.detach(), grads


def assert_same(model, arch, backend, rows, *, backward: bool):
    batch, spans = build_batch(rows)
    packed_logits, packed_loss, packed_grads = packed(model, backend, batch, backward=backward)
    reference_logits, reference_loss, reference_grads = one_by_one(
        model, arch, batch, spans, backward=backward
    )
    for (row, start, length), expected in zip(spans, reference_logits, strict=True):
        torch.testing.assert_close(packed_logits[row, start : start + length], expected, **TOLERANCE)
    torch.testing.assert_close(packed_loss, reference_loss, **TOLERANCE)
    if backward:
        assert packed_grads.keys() == reference_grads.keys()
        for name, grad in packed_grads.items():
            torch.testing.assert_close(
                grad, reference_grads[name], **TOLERANCE, msg=lambda m, n=name: f"{n}: {m}"
            )


@pytest.fixture(scope="module")
def models():
    return {arch: build_model(arch) for arch in ("llama", "qwen2", "gemma2")}


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("rows", [ONE_ROW, TWO_ROWS], ids=["one_row", "two_rows"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_equals_one_by_one(models, arch, backend, rows):
    assert_same(models[arch], arch, backend, rows, backward=True)


@pytest.mark.parametrize("rows", [ONE_ROW, TWO_ROWS], ids=["one_row", "two_rows"])
def test_packed_equals_one_by_one_with_softcapping(models, rows):
    assert_same(models["gemma2"], "gemma2", "eager", rows, backward=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_flex_forward_equals_one_by_one_on_cpu(models, arch):
    assert_same(models[arch], arch, "flex", TWO_ROWS, backward=False)


def test_flex_still_has_no_cpu_backward(models):
    """Fails when torch adds a CPU backward to FlexAttention: then flex belongs in the gradient proof above and
    `backend_available` should stop refusing it for CPU training."""
    with pytest.raises(PackedAttentionError, match="no backward pass on CPU"):
        select_backend(models["llama"], "flex", training=True)
    assert select_backend(models["llama"], "flex", training=False) == "flex"
    batch, _ = build_batch(ONE_ROW)
    enable_packed_attention(models["llama"], "flex")
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        models["llama"](**packed_forward_kwargs(batch, "flex"))


# ------------------------------------------------------------------------------------------------ controls


def test_position_ids_alone_let_samples_attend_to_each_other(models):
    """The negative control: a plain call with restarting position_ids but no boundaries. transformers 5 guesses
    boundaries from position_ids only when no cache and no attention_mask are in play; the default call has a
    cache, so the later samples see the earlier ones, and the comparison above would catch it."""
    model = models["llama"]
    model.set_attn_implementation("sdpa")
    batch, spans = build_batch(ONE_ROW)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    reference, _, _ = one_by_one(model, "llama", batch, spans, backward=False)
    gaps = [
        (logits[0, start : start + n] - ref).abs().max().item()
        for (_, start, n), ref in zip(spans, reference)
    ]
    assert gaps[0] < 1e-5  # the first sample sees nothing before it either way
    assert min(gaps[1:]) > 1e-2


def test_the_boundaries_are_what_isolates(models):
    """Same backend, same call, but the segments say the row is one sample: the later samples change."""
    model = models["llama"]
    batch, spans = build_batch(ONE_ROW)
    enable_packed_attention(model, "sdpa")
    kwargs = packed_forward_kwargs(batch, "sdpa")
    kwargs["packed_segments"].document_ids.zero_()
    with torch.no_grad():
        logits = model(**kwargs).logits
    reference, _, _ = one_by_one(model, "llama", batch, spans, backward=False)
    gaps = [
        (logits[0, start : start + n] - ref).abs().max().item()
        for (_, start, n), ref in zip(spans, reference)
    ]
    assert gaps[0] < 1e-5 and min(gaps[1:]) > 1e-2


def test_auto_picks_sdpa_on_cpu(models):
    assert select_backend(models["llama"], "auto") == "sdpa"


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("backend", "reason"),
    [
        ("flash_attn", "flash_attn package is not installed|needs CUDA"),
        ("torch_varlen", "needs CUDA"),
        ("flex", "no backward pass on CPU"),
        ("xformers", "unknown attention backend"),
    ],
)
def test_backends_that_cannot_run_here_are_refused(models, backend, reason):
    with pytest.raises(PackedAttentionError, match=reason):
        select_backend(models["llama"], backend)


def test_architecture_without_attention_interface_is_refused():
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4))  # ALiBi
    with pytest.raises(PackedAttentionError, match="does not route its attention"):
        select_backend(bloom, "sdpa")


def test_layers_that_carry_state_across_samples_are_refused():
    torch.manual_seed(0)
    lfm2 = Lfm2ForCausalLM(Lfm2Config(**SMALL, **HEADS, full_attn_idxs=[1]))  # layer 0 is a convolution
    with pytest.raises(PackedAttentionError, match=r"layers of type \['conv'\]"):
        select_backend(lfm2, "auto")


def test_softcapping_is_refused_where_the_kernel_cannot_cap(models):
    with pytest.raises(PackedAttentionError, match="attn_logit_softcapping"):
        select_backend(models["gemma2"], "sdpa")
    assert select_backend(models["gemma2"], "eager") == "eager"


def test_attention_sinks_are_refused_at_the_first_call():
    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, head_dim=16,
        num_local_experts=2, num_experts_per_tok=1, **HEADS,
    )  # fmt: skip
    model = GptOssForCausalLM(config)
    enable_packed_attention(model, select_backend(model, "eager"))
    batch, _ = build_batch(ONE_ROW)
    with pytest.raises(PackedAttentionError, match="attention sinks"):
        model(**packed_forward_kwargs(batch, "eager"))


def test_a_call_without_boundaries_is_refused(models):
    model = models["llama"]
    enable_packed_attention(model, "sdpa")
    batch, _ = build_batch(ONE_ROW)
    with pytest.raises(PackedAttentionError, match="without packed_segments"):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids)
    with pytest.raises(PackedAttentionError, match="built for eager"):
        model(**packed_forward_kwargs(batch, "eager"))


def test_attention_that_bypasses_the_boundaries_is_caught(models):
    """If the model's attention stops going through our functions (here: switched back to stock sdpa, as an
    upstream change or a stray set_attn_implementation would do), the forward hook refuses the result."""
    model = copy.deepcopy(models["llama"])
    enable_packed_attention(model, "sdpa")
    model.set_attn_implementation("sdpa")
    batch, _ = build_batch(ONE_ROW)
    with pytest.raises(PackedAttentionError, match="0 of 2 attention layers"):
        model(**packed_forward_kwargs(batch, "sdpa"))


def test_position_ids_must_match_the_boundaries():
    batch, _ = build_batch(ONE_ROW)
    batch.position_ids[0, 7] = 7  # the second sample does not restart
    with pytest.raises(ValueError, match="do not restart"):
        packed_forward_kwargs(batch, "sdpa")
    batch, _ = build_batch(ONE_ROW)
    batch.seq_lens = [[7, 11, 50]]
    with pytest.raises(ValueError, match="do not fit"):
        packed_forward_kwargs(batch, "sdpa")


# ------------------------------------------------------------------------------------------------ GPU


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen", "flex", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_equals_one_by_one_on_gpu(arch, backend):
    """bf16 on CUDA: packed and one-by-one agree to bf16 precision (relative error of the logits below 2e-2, of
    every gradient below 3e-2; the loss within 1e-2 relative). A leak moves later samples' logits by far more."""
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    model = build_model(arch, device="cuda", dtype=torch.bfloat16)
    assert select_backend(model, backend) == backend
    batch, spans = build_batch(TWO_ROWS)
    batch = PackedBatch(
        batch.input_ids.cuda(), batch.labels.cuda(), batch.position_ids.cuda(), batch.seq_lens, batch.refs
    )
    packed_logits, packed_loss, packed_grads = packed(model, backend, batch, backward=True)
    reference_logits, reference_loss, reference_grads = one_by_one(model, arch, batch, spans, backward=True)
    for (row, start, length), expected in zip(spans, reference_logits, strict=True):
        assert relative_error(packed_logits[row, start : start + length], expected) < 2e-2
    assert abs(packed_loss.item() - reference_loss.item()) <= 1e-2 * abs(reference_loss.item())
    for name, grad in packed_grads.items():
        assert relative_error(grad, reference_grads[name]) < 3e-2, name
