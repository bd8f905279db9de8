"""LoRA on the ZeRO-3 pipeline, proven like full-parameter training (real `deepspeed` processes on CPU, gloo, fp32),
over the prepared rows of checkpoint_runs.prepared_overrides (6 rows a step, clipping and weight decay that bite,
a checkpoint every 2 steps) with an adapter on every linear layer:

- 2 ranks x 3 accumulation steps == 1 rank x 1 step: per-step loss, gradient norm, final adapter weights;
- killed with SIGKILL after a checkpoint and rerun == uninterrupted, bitwise on the same number of ranks; resumed
  on 1 rank from 2 ranks' checkpoint (DeepSpeed's universal checkpoint of the adapter) == uninterrupted;
- the checkpoint holds the adapter only; the exported adapter directory, loaded with PeftModel.from_pretrained on
  the base, gives the trained engine's logits, and so does `ift export --merge`'s merged model;
- the frozen base weights are bitwise the base model's after more training steps with weight decay;
- DoRA, rsLoRA and a trained tied output head (modules_to_save) export and merge to the same model.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from checkpoint_runs import (
    assert_same_steps,
    cut_back,
    prepared_overrides,
    reference,
    start,
    wait_for_step,
)
from dist_helpers import check, launch
from safetensors.torch import load_file
from test_checkpoint_export import engine_logits
from transformers import AutoModelForCausalLM

from ift_dist import cli

pytestmark = [pytest.mark.dist, pytest.mark.slow]

LORA = [
    "model.adapter.type=lora",
    "model.adapter.r=4",
    "model.adapter.alpha=8",
    "model.adapter.dropout=0.0",  # dropout would make the ranks' random streams part of the result
    "model.adapter.target_modules=all-linear",
    "train.learning_rate=1.0e-2",
]
# 2 layers x 7 linear layers (q, k, v, o, gate, up, down) x (A, B)
ADAPTER_TENSORS = 28


@pytest.fixture(scope="module")
def overrides(tiny_model, prepared_data) -> list[str]:
    return [*prepared_overrides(tiny_model, prepared_data), *LORA]


@pytest.fixture(scope="module")
def uninterrupted(dist_dir, overrides):
    return reference(dist_dir / "lora-reference", overrides)


def adapter_weights(run) -> dict[str, torch.Tensor]:
    weights = run.weights()
    assert weights and all(".lora_" in name for name in weights), sorted(weights)[:5]
    return weights


def test_two_ranks_with_accumulation_equal_one_rank(dist_dir, uninterrupted, overrides):
    one = check(launch(dist_dir / "lora-one-rank", [*overrides, "train.micro_batch_rows=6"], ranks=1))
    assert "1 rows per micro batch x 2 ranks x 3 accumulation steps" in uninterrupted.output
    assert "6 rows per micro batch x 1 ranks x 1 accumulation steps" in one.output
    assert_same_steps(one, uninterrupted, range(1, 9), rtol=1e-6)
    ours, theirs = adapter_weights(uninterrupted), adapter_weights(one)
    assert ours.keys() == theirs.keys() and len(ours) == ADAPTER_TENSORS
    for name, tensor in ours.items():  # 0.1% of one AdamW step (lr 1e-2): the roundoff of near-zero gradients
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-5, msg=name)


def test_counts_are_peft_counts_and_the_checkpoint_holds_the_adapter_only(uninterrupted, tiny_model):
    from peft import get_peft_model

    from ift_dist.adapter import lora_config
    from ift_dist.config import AdapterConfig

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = AdapterConfig(type="lora", r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    trainable, total = get_peft_model(base, lora_config(config)).get_nb_trainable_parameters()
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    assert line in uninterrupted.output
    counts = [r for r in uninterrupted.records() if "trainable_parameters" in r]
    assert counts == [{"step": 0, "trainable_parameters": trainable, "total_parameters": total}]
    step = uninterrupted.output_dir / "checkpoints" / "step_8"
    model_states = [path for path in step.glob("*model_states.pt")]
    base_bytes = sum(p.numel() * 4 for p in base.parameters())
    assert model_states and all(path.stat().st_size < base_bytes / 20 for path in model_states)
    optimizer_bytes = sum(path.stat().st_size for path in step.glob("*optim_states.pt"))
    assert optimizer_bytes < base_bytes / 4  # fp32 master + 2 Adam moments of the adapter, not of the base


def test_killed_after_a_checkpoint_then_rerun_is_bitwise_the_uninterrupted_run(
    dist_dir, uninterrupted, overrides
):
    run_dir = dist_dir / "lora-killed"
    process, _ = start(run_dir, overrides)
    wait_for_step(run_dir, 5, process, "")  # step_4 is saved before step 5 starts
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (run_dir / "checkpoints" / "step_4" / "complete.json").is_file()
    finished = check(launch(run_dir, overrides))
    assert "step_4 (step 4, 2 ranks)" in finished.output or "step_6 (step 6, 2 ranks)" in finished.output
    assert_same_steps(finished, uninterrupted, range(1, 9), rtol=0)
    ours, theirs = adapter_weights(finished), adapter_weights(uninterrupted)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(tensor, theirs[name]) for name, tensor in ours.items())


def test_resumed_on_one_rank_continues_the_same_training(dist_dir, uninterrupted, overrides):
    run_dir = cut_back(uninterrupted, dist_dir / "lora-resumed-on-1", 4)
    run = check(launch(run_dir, [*overrides, "export.at_end=false"], ranks=1))
    assert "the checkpoint was written by 2 ranks, this run has 1: converting" in run.output
    assert_same_steps(run, uninterrupted, range(1, 9))
    ours, theirs = adapter_weights(run), adapter_weights(uninterrupted)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-5, msg=name)


def test_exported_adapter_and_merged_model_give_the_engines_logits(uninterrupted, tiny_model, tmp_path):
    from peft import PeftModel

    export = uninterrupted.output_dir / "hf_model"
    assert "exported the LoRA adapter" in uninterrupted.output
    adapter = load_file(export / "adapter_model.safetensors")
    assert len(adapter) == ADAPTER_TENSORS
    assert all(
        tensor.abs().max() > 0 for tensor in adapter.values()
    )  # B starts at zero: trained values are there
    config = json.loads((export / "adapter_config.json").read_text())
    assert (
        config["r"] == 4
        and config["lora_alpha"] == 8
        and config["base_model_name_or_path"] == str(tiny_model)
    )
    assert not (export / "config.json").exists() and (export / "chat_template.jinja").is_file()

    expected = engine_logits(uninterrupted.output_dir, tmp_path / "logits.pt", train_steps=2)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        initial = base(input_ids=expected["tokens"]).logits
        adapted = PeftModel.from_pretrained(base, export)(input_ids=expected["tokens"]).logits
    torch.testing.assert_close(adapted, expected["logits"], rtol=0, atol=1e-5)
    assert (initial - expected["logits"]).abs().max() > 1e-2  # the adapter changed the model

    merged_dir = tmp_path / "merged"
    assert cli.main(["export", str(uninterrupted.output_dir), str(merged_dir), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, attn_implementation="sdpa")
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=expected["tokens"]).logits, expected["logits"], rtol=0, atol=1e-5
        )

    # Two more optimizer steps (weight decay 0.1, lr 1e-2) left every frozen weight bitwise the base model's.
    pristine = dict(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).named_parameters())
    frozen = {name.replace(".base_layer", ""): tensor for name, tensor in expected["frozen"].items()}
    assert frozen.keys() == pristine.keys()
    assert all(torch.equal(tensor, pristine[name].detach()) for name, tensor in frozen.items())


def test_dora_rslora_and_a_trained_tied_head_export_and_merge(dist_dir, tiny_model, prepared_data, tmp_path):
    """The other adapter options through the same path on 1 rank: DoRA's magnitudes, rsLoRA's scale, and the tied
    output head trained in full (modules_to_save) stay tied to the input embeddings, in training and in the export."""
    from peft import PeftModel

    options = [
        "model.adapter.use_dora=true",
        "model.adapter.use_rslora=true",
        "model.adapter.modules_to_save=[lm_head]",
    ]
    overrides = [*prepared_overrides(tiny_model, prepared_data), *LORA, *options, "train.max_steps=2"]
    run = check(launch(dist_dir / "lora-dora", overrides, ranks=1))
    adapter = load_file(run.output_dir / "hf_model" / "adapter_model.safetensors")
    assert sum("lora_magnitude_vector" in name for name in adapter) == 14
    head, embeddings = (
        adapter["base_model.model.lm_head.weight"],
        adapter["base_model.model.model.embed_tokens.weight"],
    )
    assert torch.equal(head, embeddings)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert not torch.equal(head, base.lm_head.weight)  # trained
    tokens = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2, 198]])
    assert cli.main(["export", str(run.output_dir), str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, run.output_dir / "hf_model")(input_ids=tokens).logits
        torch.testing.assert_close(merged(input_ids=tokens).logits, adapted, rtol=0, atol=1e-5)
