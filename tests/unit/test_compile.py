"""model.compile without DeepSpeed: what it refuses, which modules it compiles, and that compiling changes no names
(a compiled run's checkpoint loads into an eager model). The numerics under ZeRO-3: tests/dist/test_compile_zero3.py."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_model import tiny_llama

from ift_dist.compile import compile_decoder_layers, compiled_forward, decoder_layers, make_leaf_modules
from ift_dist.config import ConfigError, load_config

LAYER_CLASS = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"


def test_off_by_default():
    assert load_config(None, []).model.compile is False


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.adapter.type=lora"],
        ["model.adapter.type=lora", "model.quantization.bits=4"],
    ],
)
def test_refused_with_an_adapter_naming_the_keys(overrides):
    with pytest.raises(ConfigError, match=r"model\.compile: not with model\.adapter\.type=lora "):
        load_config(None, ["model.compile=true", *overrides])


def test_decoder_layers_are_the_repeated_blocks():
    model = tiny_llama(num_hidden_layers=3)
    layers = decoder_layers(model)
    assert layers == list(model.model.layers)


def test_leaf_modules_keep_the_json_ones():
    model = tiny_llama()
    ds_config = {"zero_optimization": {"stage": 3, "leaf_module": {"classes": "some.MoeBlock"}}}
    assert make_leaf_modules(ds_config, decoder_layers(model)) == [LAYER_CLASS]
    assert ds_config["zero_optimization"]["leaf_module"]["classes"] == ["some.MoeBlock", LAYER_CLASS]
    make_leaf_modules(ds_config, decoder_layers(model))  # idempotent
    assert ds_config["zero_optimization"]["leaf_module"]["classes"] == ["some.MoeBlock", LAYER_CLASS]


def test_compiling_changes_no_parameter_names():
    model = tiny_llama()
    keys = list(model.state_dict())
    layers = compile_decoder_layers(model, {})  # lazy: nothing is compiled before the first call
    assert len(layers) == 2
    assert list(model.state_dict()) == keys
    assert not any("_orig_mod" in name for name, _ in model.named_parameters())
    eager = tiny_llama(seed=1)
    eager.load_state_dict(model.state_dict())  # strict


def test_refused_when_checkpointing_is_not_transformers_wrapper():
    class Layer(torch.nn.Module):
        gradient_checkpointing = True

        def forward(self, hidden):
            return hidden

    with pytest.raises(ValueError, match=r"model\.compile with model\.gradient_checkpointing"):
        compiled_forward(Layer())


def test_graph_report_reads_dynamos_counters():
    from ift_dist.compile import graph_report

    assert re.fullmatch(
        r"torch\.compile: \d+ graphs, \d+ graph breaks, \d+ of \d+ frames compiled.*", graph_report()
    )


def test_switching_compile_or_the_dw_strategy_never_blocks_a_resume():
    from ift_dist.checkpoint.compat import config_changes
    from ift_dist.config import Config, to_dict

    old, new = to_dict(Config()), to_dict(Config())
    new["model"]["compile"] = True
    new["train"]["fused_loss_dw"] = "rows_inplace"
    new["model"]["gradient_checkpointing"] = True
    assert config_changes(old, new) == (
        [],
        ["model.compile", "model.gradient_checkpointing", "train.fused_loss_dw"],
    )
