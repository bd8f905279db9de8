"""The training loss: fused == reference == the HF model's own loss on packed rows (loss and every gradient, tied and
untied embeddings), the label shift, and the one function that compensates for DeepSpeed's scaling."""

from __future__ import annotations

import pytest
import torch
from tiny_model import tiny_llama
from transformers import LlamaForCausalLM

from ift_dist.attention import enable_packed_attention, packed_forward_kwargs
from ift_dist.data.contracts import IGNORE_INDEX, PackedBatch
from ift_dist.loss import CausalLMLoss, check_fused_supported, deepspeed_backward_loss, shift_labels

VOCAB = 300


def packed_llama(tied: bool) -> LlamaForCausalLM:
    model = tiny_llama(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, tie_word_embeddings=tied, pad_token_id=None
    )
    enable_packed_attention(model, "sdpa")
    return model


def packed_batch(rows=((9, 6, 12), (20,)), total=32, seed=0) -> PackedBatch:
    """Rows of packed samples, padding at the end; the prompt half of each sample unsupervised."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (len(rows), total), generator=generator)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    position_ids = torch.zeros_like(input_ids)
    for row, lengths in enumerate(rows):
        start = 0
        for length in lengths:
            reply = start + length // 2
            labels[row, reply : start + length] = input_ids[row, reply : start + length]
            position_ids[row, start : start + length] = torch.arange(length)
            start += length
    return PackedBatch(input_ids, labels, position_ids, [list(r) for r in rows], [[] for _ in rows])


def loss_and_grads(model, mode, batch, weight_grad_pass="auto"):
    model.zero_grad()
    module = CausalLMLoss(model, mode, weight_grad_pass)
    loss = module(labels=batch.labels, **packed_forward_kwargs(batch, "sdpa"))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_shift_labels_aligns_each_position_with_the_next_label():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7]])
    assert shift_labels(labels).tolist() == [[5, 6, IGNORE_INDEX, 7, IGNORE_INDEX]]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fused_equals_reference_equals_the_models_own_loss(tied):
    model = packed_llama(tied)
    batch = packed_batch()
    fused, fused_grads = loss_and_grads(model, "fused", batch)
    reference, reference_grads = loss_and_grads(model, "reference", batch)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == reference_grads.keys()
    for name, gradient in fused_grads.items():
        torch.testing.assert_close(gradient, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # Upstream's own loss (its label shift and mean over supervised targets) times the supervised count: if
    # transformers changes its label convention, this fails.
    with torch.no_grad():
        hf_mean = model(labels=batch.labels, **packed_forward_kwargs(batch, "sdpa")).loss
    torch.testing.assert_close(fused, hf_mean * batch.num_loss_tokens, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("weight_grad_pass", ["vocab", "rows", "rows_inplace"])
def test_every_dw_strategy_of_the_fused_head_gives_the_reference_gradients(weight_grad_pass):
    # train.fused_loss_dw reaches the kernel: a wrong strategy name fails here, and each one trains the same model.
    model = packed_llama(tied=False)
    batch = packed_batch()
    fused, fused_grads = loss_and_grads(model, "fused", batch, weight_grad_pass)
    reference, reference_grads = loss_and_grads(model, "reference", batch)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    for name, gradient in fused_grads.items():
        torch.testing.assert_close(gradient, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="weight_grad_pass"):
        loss_and_grads(model, "fused", batch, "columns")


def test_the_fused_head_shares_the_output_weight():
    for tied in (True, False):
        model = packed_llama(tied)
        module = CausalLMLoss(model, "fused")
        assert module.head.weight is model.get_output_embeddings().weight
        assert (module.head.weight is model.get_input_embeddings().weight) == tied
        assert len(list(module.parameters())) == len(list(model.parameters()))  # nothing new to train


def test_a_batch_without_supervised_tokens_has_zero_loss():
    batch = packed_batch()
    batch.labels.fill_(IGNORE_INDEX)
    model = packed_llama(tied=True)
    for mode in ("fused", "reference"):
        loss, grads = loss_and_grads(model, mode, batch)
        assert loss.item() == 0.0 and all(not g.any() for g in grads.values())


def test_models_that_rescale_their_logits_are_refused_by_the_fused_path():
    model = packed_llama(tied=True)
    model.config.logit_scale = 0.0625  # Cohere-style: logits * logit_scale after lm_head
    with pytest.raises(ValueError, match=r"config\.logit_scale=0\.0625.*use train\.loss=reference"):
        check_fused_supported(model)
    CausalLMLoss(model, "reference")  # the reference path runs the model's own forward, scaling included


def test_deepspeed_compensation_arithmetic():
    """x = loss_sum x W x A / N: DeepSpeed's 1/A (backward) and 1/W (rank averaging) leave loss_sum / N."""
    world, accumulation, tokens = 4, 3, 600
    loss_sum = torch.tensor(120.0)
    backward_loss = deepspeed_backward_loss(loss_sum, tokens, world, accumulation)
    assert backward_loss.item() == pytest.approx(120.0 * 12 / 600)
    assert (backward_loss / accumulation / world).item() == pytest.approx(120.0 / 600)
    assert deepspeed_backward_loss(torch.tensor(0.0), 0, world, accumulation).item() == 0.0
