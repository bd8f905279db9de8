"""What a real multi-rank run does when something is wrong: non-finite steps are skipped and then stop the run;
a DeepSpeed JSON that sets a key of ours is refused before any rank waits for another."""

from __future__ import annotations

import json

import pytest
import torch
from dist_helpers import launch
from tiny_model import save_tiny_llama
from transformers import AutoModelForCausalLM

from ift_dist.exit_codes import CONFIG_ERROR, TOO_MANY_BAD_STEPS

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory):
    """The tiny model with one infinite weight: every forward pass gives a NaN loss and NaN gradients."""
    directory = save_tiny_llama(tmp_path_factory.mktemp("poisoned") / "model")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    model.save_pretrained(directory)
    return directory


def poisoned_overrides(model, max_steps: int, max_bad_steps: int) -> list[str]:
    return [
        f"model.name_or_path={model}",
        f"train.max_steps={max_steps}",
        f"train.max_bad_steps={max_bad_steps}",
        "train.sample_prompts=[]",
        "data.eval_sources=[]",
    ]


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, poisoned_model):
    run = launch(tmp_path / "nan", poisoned_overrides(poisoned_model, max_steps=6, max_bad_steps=2))
    assert run.returncode == TOO_MANY_BAD_STEPS, run.output[-20000:]
    assert "2 optimizer steps in a row (up to step 2) had a non-finite loss" in run.output
    assert "step 1 skipped" in run.output
    records = run.train_records()
    assert [record["step"] for record in records] == [1, 2]  # stopped at max_bad_steps, not max_steps
    for record in records:
        assert record["skipped"] is True and record["loss"] is None and record["grad_norm"] is None
        assert record["supervised_tokens"] > 0
    assert not (run.output_dir / "checkpoints").exists()  # nothing saved from a failed run


@pytest.mark.slow
def test_a_skipped_step_leaves_the_weights_untouched(tmp_path, poisoned_model):
    """Fewer bad steps in a row than train.max_bad_steps: the run ends normally, and since every step was skipped
    the saved weights (fp32 master copy) are exactly the initial ones."""
    run = launch(tmp_path / "skip", poisoned_overrides(poisoned_model, max_steps=2, max_bad_steps=3))
    assert run.returncode == 0, run.output[-20000:]
    assert [record["skipped"] for record in run.train_records()] == [True, True]
    initial = AutoModelForCausalLM.from_pretrained(poisoned_model, dtype=torch.float32).state_dict()
    weights = run.weights()
    for name, tensor in initial.items():
        assert torch.equal(weights[f"model.{name}"], tensor), name


def test_deepspeed_json_that_sets_our_keys_is_refused(tmp_path, tiny_model):
    """Through `ift train --num-gpus 2`, which runs the deepspeed launcher and returns its exit code."""
    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4}))
    overrides = [f"model.name_or_path={tiny_model}", f"train.zero_config={zero}"]
    run = launch(tmp_path / "bad", overrides, timeout=120, via_ift=True)
    assert run.returncode == CONFIG_ERROR
    message = "sets 'train_micro_batch_size_per_gpu', which ift-dist sets itself from train.micro_batch_rows"
    assert run.output.count(message) >= 1  # before the rendezvous (a rank may be killed before it prints)
    assert not (run.output_dir / "metrics.jsonl").exists()
