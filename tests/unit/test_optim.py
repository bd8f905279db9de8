"""Batch geometry, AdamW parameter groups and the learning rate schedule: pure arithmetic, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ift_dist.config import ConfigError, TrainConfig, batch_plan, load_config
from ift_dist.optim import learning_rate, parameter_groups, set_learning_rate


def test_accumulation_steps_are_derived_from_the_global_batch():
    plan = batch_plan(TrainConfig(global_batch_rows=64, micro_batch_rows=2), max_length=4096, world_size=8)
    assert (plan.accumulation_steps, plan.global_batch_rows, plan.global_batch_tokens) == (4, 64, 64 * 4096)
    assert plan.describe().endswith("2 rows per micro batch x 8 ranks x 4 accumulation steps")


def test_a_global_batch_in_tokens_is_rows_of_max_length():
    plan = batch_plan(TrainConfig(global_batch_tokens=524288), max_length=8192, world_size=8)
    assert (plan.global_batch_rows, plan.accumulation_steps) == (64, 8)


def test_no_global_batch_means_one_micro_batch_per_rank():
    plan = batch_plan(TrainConfig(micro_batch_rows=3), max_length=512, world_size=4)
    assert (plan.global_batch_rows, plan.accumulation_steps) == (12, 1)


def test_a_global_batch_that_does_not_divide_names_the_key_and_what_would():
    with pytest.raises(ConfigError, match=r"^train\.global_batch_rows: 10 rows .* = 4; e\.g\. 8 or 12$"):
        batch_plan(TrainConfig(global_batch_rows=10, micro_batch_rows=2), max_length=512, world_size=2)
    with pytest.raises(ConfigError, match=r"^train\.global_batch_tokens: 3 rows .* e\.g\. 2048 or 4096$"):
        batch_plan(TrainConfig(global_batch_tokens=3 * 1024), max_length=1024, world_size=2)


def test_config_refuses_two_global_batch_sizes_and_tokens_that_are_not_whole_rows():
    with pytest.raises(ConfigError, match=r"^train\.global_batch_rows: set it or train\.global_batch_tokens"):
        load_config(overrides=["train.global_batch_rows=8", "train.global_batch_tokens=8192"])
    with pytest.raises(
        ConfigError, match=r"^train\.global_batch_tokens: 1000 is not a multiple of data\.max_length"
    ):
        load_config(overrides=["train.global_batch_tokens=1000", "data.max_length=512"])
    with pytest.raises(ConfigError, match=r"^train\.lr_schedule: 'step' is not one of"):
        load_config(overrides=["train.lr_schedule=step"])
    with pytest.raises(ConfigError, match=r"^train\.loss: 'fast' is not one of fused, reference"):
        load_config(overrides=["train.loss=fast"])


def schedule(**options) -> TrainConfig:
    return TrainConfig(learning_rate=1.0, max_steps=110, warmup_steps=10, **options)


def test_warmup_is_linear_from_one_step_to_the_peak():
    train = schedule()
    assert [learning_rate(step, train) for step in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_decays_to_the_floor_at_max_steps():
    train = schedule(min_lr_ratio=0.1)
    assert learning_rate(10, train) == pytest.approx(1.0)
    assert learning_rate(60, train) == pytest.approx(0.55)  # halfway: the mean of peak and floor
    assert learning_rate(35, train) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(110, train) == pytest.approx(0.1)
    assert learning_rate(500, train) == pytest.approx(0.1)  # past max_steps it stays at the floor


def test_linear_and_constant_schedules():
    linear = schedule(lr_schedule="linear")
    assert [learning_rate(step, linear) for step in (10, 35, 60, 110)] == pytest.approx([1.0, 0.75, 0.5, 0.0])
    constant = schedule(lr_schedule="constant")
    assert {learning_rate(step, constant) for step in (10, 60, 110, 1000)} == {1.0}


def test_without_warmup_the_first_step_uses_the_peak():
    assert learning_rate(0, TrainConfig(learning_rate=3e-5, warmup_steps=0)) == pytest.approx(3e-5)


def test_norms_and_biases_get_no_weight_decay():
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        attention_bias=True,
    )
    model = LlamaForCausalLM(config)
    decay, no_decay = parameter_groups(model.named_parameters(), weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    assert all(parameter.dim() == 2 for parameter in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {
        name for name, p in model.named_parameters() if "norm" in name or name.endswith(".bias")
    }


def test_a_zero3_shard_is_grouped_by_its_full_shape():
    shard = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves outside a forward pass
    shard.ds_shape = torch.Size([8, 4])
    frozen = torch.nn.Parameter(torch.ones(3, 3), requires_grad=False)
    groups = parameter_groups([("matrix", shard), ("frozen", frozen)], weight_decay=0.01)
    assert len(groups) == 1 and groups[0]["params"] == [shard]


def test_set_learning_rate_reaches_every_group():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(parameter_groups(model.named_parameters(), 0.1), lr=1.0)
    set_learning_rate(optimizer, 0.25)
    assert [group["lr"] for group in optimizer.param_groups] == [0.25, 0.25]
