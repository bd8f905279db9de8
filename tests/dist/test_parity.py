"""Parity under ZeRO-3 on CPU ranks (gloo, fp32), real deepspeed processes:

- 2 ranks x 2 accumulation steps == 1 rank x 1 step over the same global batch: per-step loss, gradient norm and the
  updated weights. The data are prepared (packed) shards, so both read the same rows per step (conftest.py).
  The gradient norm is what catches a wrong normalisation: AdamW's update is blind to a constant gradient scale.
- train.loss=fused == train.loss=reference (the fused head reads the tied lm_head/embedding weight where ZeRO-3
  gathers it).
"""

from __future__ import annotations

import pytest
import torch
from dist_helpers import check, launch

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def one_rank_run(dist_dir, parity_overrides):
    overrides = [
        *parity_overrides,
        "train.loss=fused",
        "train.micro_batch_rows=4",
        "train.sample_prompts=[]",
        "data.eval_sources=[]",
    ]
    return check(launch(dist_dir / "one-rank", overrides, ranks=1))


@pytest.fixture(scope="module")
def reference_run(dist_dir, parity_overrides):
    overrides = [*parity_overrides, "train.loss=reference", "train.sample_prompts=[]", "data.eval_sources=[]"]
    return check(launch(dist_dir / "reference", overrides))


def assert_same_training(run, other, *, loss_rtol, weight_atol):
    """Same tokens, loss and gradient norm every step, same weights at the end. weight_atol = 1% of one AdamW step
    (lr 1e-3): AdamW turns the roundoff of near-zero gradients into differences of up to ~1e-6."""
    ours, theirs = run.train_records(), other.train_records()
    assert [r["supervised_tokens"] for r in ours] == [r["supervised_tokens"] for r in theirs]
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in theirs]
    for mine, yours in zip(ours, theirs, strict=True):
        assert mine["loss"] == pytest.approx(yours["loss"], rel=loss_rtol)
        assert mine["grad_norm"] == pytest.approx(yours["grad_norm"], rel=loss_rtol)
    # The HF model's parameters; the fused run also lists its loss head, an alias of the tied lm_head weight.
    weights = {name: tensor for name, tensor in run.weights().items() if name.startswith("model.")}
    other_weights = {name: tensor for name, tensor in other.weights().items() if name.startswith("model.")}
    assert weights.keys() == other_weights.keys() and len(weights) == 21
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, other_weights[name], rtol=0, atol=weight_atol, msg=name)


def test_two_ranks_with_accumulation_equal_one_rank(main_run, one_rank_run):
    assert "2 ranks x 2 accumulation steps" in main_run.output
    assert "4 rows per micro batch x 1 ranks x 1 accumulation steps" in one_rank_run.output
    assert_same_training(main_run, one_rank_run, loss_rtol=1e-6, weight_atol=1e-5)


def test_fused_loss_equals_reference_under_zero3(main_run, reference_run):
    assert_same_training(main_run, reference_run, loss_rtol=1e-6, weight_atol=1e-5)
