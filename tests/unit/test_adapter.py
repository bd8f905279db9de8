"""model.adapter (LoRA through peft) and model.quantization in one process: config checks, target names checked
against the model, the fused loss through a frozen (tied or untied) output head equal to the reference without
forming logits, gradients on the adapter only, peft's parameter counts, a seeded initial adapter, the adapter file
checks, QLoRA refused on the CPU. The multi-rank proofs (parity, resume, export) are in tests/dist/test_lora.py."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from tiny_model import tiny_llama

from ift_dist.adapter import apply_adapter, check_targets, count_line, parameter_counts
from ift_dist.config import AdapterConfig, ConfigError, ModelConfig, load_config
from ift_dist.export_adapter import check_adapter
from ift_dist.loss import CausalLMLoss

SMALL = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}


def lora(**fields) -> AdapterConfig:
    config = AdapterConfig(**{"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, **fields})
    config.validate("model.adapter")
    return config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.adapter.target_modules=q_proj", "model.adapter.target_modules: a list of module names"),
        ("model.adapter.target_modules=[]", "model.adapter.target_modules: a non-empty list"),
        ("model.adapter.dropout=1.5", "model.adapter.dropout: must be in [0, 1)"),
        ("model.adapter.r=0", "model.adapter.r: must be > 0"),
        ("model.adapter.type=qlora", "model.adapter.type: 'qlora' is not one of none, lora"),
        ("model.quantization.bits=4", "model.quantization.bits: a quantized base cannot be trained in full"),
        ("model.quantization.bits=8", "model.quantization.bits: 0 (none) or 4 (QLoRA), got 8"),
        ("model.adapter.rank=8", "model.adapter.rank: unknown key"),
    ],
)
def test_bad_adapter_settings_are_config_errors_naming_the_key(tmp_path, override, message):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: some/model}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, [override])
    assert message in str(error.value)


def test_all_linear_and_lists_load():
    path_config = AdapterConfig(type="lora", target_modules="all-linear")
    path_config.validate("model.adapter")
    assert path_config.targets() == "all-linear"
    assert lora(target_modules=["q_proj", "v_proj"]).targets() == ["q_proj", "v_proj"]


def test_a_missing_target_names_the_linear_layers_the_model_has():
    model = tiny_llama(**SMALL)
    with pytest.raises(ConfigError) as error:
        check_targets(model, lora(target_modules=["q_proj", "query_key_value"]))
    assert (
        "model.adapter.target_modules: LlamaForCausalLM has no linear layer named 'query_key_value'"
        in str(error.value)
    )
    assert "it has: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in str(
        error.value
    )
    with pytest.raises(
        ConfigError, match=r"model\.adapter\.modules_to_save: LlamaForCausalLM has no module named 'wte'"
    ):
        check_targets(model, lora(modules_to_save=["wte"]))


def test_quantization_is_refused_on_the_cpu_before_loading():
    from ift_dist.model import load_model

    config = ModelConfig(name_or_path="does/not/matter")
    config.adapter = lora()
    config.quantization.bits = 4
    config.validate("model")
    with pytest.raises(ConfigError, match=r"model\.quantization: 4-bit QLoRA needs CUDA GPUs"):
        load_model(config, device="cpu")


@pytest.mark.parametrize("tied", [True, False])
def test_fused_loss_through_the_frozen_head_equals_the_reference_and_trains_the_adapter_only(tied):
    torch.manual_seed(0)
    losses, gradients = {}, {}
    for mode in ("fused", "reference"):
        model = tiny_llama(tie_word_embeddings=tied, **SMALL)
        apply_adapter(model, lora(target_modules="all-linear"), seed=3)
        module = CausalLMLoss(model, mode)
        head_calls: list[int] = []
        model.lm_head.register_forward_hook(lambda *_, calls=head_calls: calls.append(1))
        ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
        labels = ids.clone()
        labels[:, :5] = -100
        loss = module(labels=labels, input_ids=ids)
        loss.backward()
        assert head_calls == ([] if mode == "fused" else [1])  # the fused path never forms the logits
        losses[mode] = loss.detach()
        gradients[mode] = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
        frozen = [p for p in module.parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for p in frozen)
        assert not module.model.lm_head.weight.requires_grad
    torch.testing.assert_close(losses["fused"], losses["reference"], rtol=1e-6, atol=1e-5)
    assert gradients["fused"].keys() == gradients["reference"].keys()
    assert all(".lora_" in name for name in gradients["fused"]) and len(gradients["fused"]) == 28
    for name, gradient in gradients["fused"].items():
        torch.testing.assert_close(gradient, gradients["reference"][name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(g.abs().max() > 0 for n, g in gradients["fused"].items() if "lora_B" in n)  # A is 0 while B is


def test_counts_are_peft_counts():
    model = tiny_llama(**SMALL)
    peft_model = apply_adapter(model, lora(), seed=0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        peft_model.print_trainable_parameters()
    counts = parameter_counts(model, peft_model)
    assert (
        count_line(counts["trainable_parameters"], counts["total_parameters"]) == printed.getvalue().strip()
    )
    # 2 layers x 4 projections x (A: r x in + B: out x r); k and v are 16 wide (2 of 4 heads)
    assert counts["trainable_parameters"] == 2 * (2 * 4 * (32 + 32) + 2 * 4 * (32 + 16))
    full = parameter_counts(tiny_llama(**SMALL))
    base = counts["total_parameters"] - counts["trainable_parameters"]
    assert full == {"trainable_parameters": base, "total_parameters": base}


def test_the_initial_adapter_depends_on_the_seed_only():
    def adapter(seed: int, noise: int) -> dict[str, torch.Tensor]:
        model = tiny_llama(**SMALL)
        torch.manual_seed(noise)  # whatever loading did to the global RNG
        apply_adapter(model, lora(), seed=seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    first, again, other = adapter(7, 0), adapter(7, 123), adapter(8, 0)
    assert all(torch.equal(tensor, again[name]) for name, tensor in first.items())
    assert not all(torch.equal(tensor, other[name]) for name, tensor in first.items())
    model = tiny_llama(**SMALL)
    state = torch.random.get_rng_state()
    apply_adapter(model, lora(), seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched (training's stream)


def test_rslora_and_dora_train_from_the_base_model():
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    base = tiny_llama(**SMALL)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    for fields in ({"use_rslora": True}, {"use_dora": True}, {"init": "gaussian"}):
        model = tiny_llama(**SMALL)
        apply_adapter(model, lora(**fields), seed=0)
        with (
            torch.no_grad()
        ):  # B starts at zero (DoRA's magnitude at the weight norm): the base model's logits
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_adapter_file_checks():
    good = {"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.ones(3, 2)}
    check_adapter(good, expected=2, step=5)
    with pytest.raises(ValueError, match="empty"):
        check_adapter({}, expected=2, step=5)
    with pytest.raises(ValueError, match="has 1 tensors, the model 2"):
        check_adapter({"a.lora_A.weight": torch.ones(2, 3)}, expected=2, step=5)
    zero_b = {**good, "a.lora_B.weight": torch.zeros(3, 2)}
    with pytest.raises(ValueError, match="1 adapter tensors are all zeros after 5 steps"):
        check_adapter(zero_b, expected=2, step=5)
    check_adapter(zero_b, expected=2, step=0)  # before any step B is zero by design
