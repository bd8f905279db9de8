"""The Hugging Face export of a trained run (the uninterrupted run of test_checkpoint_interrupted.py, exported by
itself when training ended): loaded with AutoModelForCausalLM it gives the trained ZeRO-3 engine's logits, its
weights are DeepSpeed's own zero_to_fp32 consolidation, it carries the tokenizer with the chat template training
used; `ift export` writes the same weights in another dtype, cut into several files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from checkpoint_runs import prepared_overrides, reference
from dist_helpers import HANG_TIMEOUT, REPO, free_port
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ift_dist import cli
from ift_dist.config import load_config
from ift_dist.data.render import Renderer, load_tokenizer

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(dist_dir, tiny_model, prepared_data):
    return reference(dist_dir / "prepared-reference", prepared_overrides(tiny_model, prepared_data))


@pytest.fixture(scope="module")
def consolidated(trained) -> dict[str, torch.Tensor]:
    """DeepSpeed's zero_to_fp32 of the final checkpoint, named as in the HF model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(str(trained.output_dir / "checkpoints"))
    return {
        name.removeprefix("model."): tensor for name, tensor in weights.items() if name.startswith("model.")
    }


def engine_logits(run_dir, out, train_steps: int = 0) -> dict[str, torch.Tensor]:
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port"]
    command += [str(free_port()), str(REPO / "tests" / "dist" / "engine_logits.py"), str(run_dir), str(out)]
    command += ["--train-steps", str(train_steps)] if train_steps else []
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=HANG_TIMEOUT, check=False
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-10000:]
    return torch.load(out, weights_only=True)


def test_the_exported_model_gives_the_trained_engines_logits(trained, tiny_model, tmp_path):
    export = trained.output_dir / "hf_model"
    assert f"exported {export}" in trained.output
    expected = engine_logits(trained.output_dir, tmp_path / "logits.pt")
    logits = {}
    for name, path in (("exported", export), ("initial", tiny_model)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
        with torch.no_grad():
            logits[name] = model(input_ids=expected["tokens"]).logits
    assert logits["exported"].shape == (2, 12, 49152)
    torch.testing.assert_close(logits["exported"], expected["logits"], rtol=0, atol=1e-5)
    assert (logits["initial"] - expected["logits"]).abs().max() > 1e-2  # the engine holds the trained weights


def test_the_exported_weights_are_deepspeeds_consolidation(trained, consolidated):
    export = trained.output_dir / "hf_model"
    weights = load_file(export / "model.safetensors")
    # Tied embeddings: lm_head.weight is embed_tokens.weight, stored once as Hugging Face does.
    assert weights.keys() == consolidated.keys() - {"lm_head.weight"}
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, consolidated[name]), name
    config = json.loads((export / "config.json").read_text())
    assert (
        config["use_cache"] is True and config["dtype"] == "float32" and config["tie_word_embeddings"] is True
    )
    assert json.loads((export / "ift_export.json").read_text())["step"] == 8


def test_the_export_carries_the_chat_template_used_in_training(trained):
    export = trained.output_dir / "hf_model"
    cfg = load_config(trained.output_dir / "config.yaml")
    training_tokenizer = load_tokenizer(str(REPO / cfg.data.tokenizer))
    template = Renderer(training_tokenizer, cfg.data).chat_template
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert template and tokenizer.chat_template == template
    messages = [{"role": "user", "content": "Who are you?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == training_tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False
    )
    assert GenerationConfig.from_pretrained(export).eos_token_id == 2


def test_ift_export_writes_size_limited_files_in_another_dtype(trained, consolidated, tmp_path):
    out = tmp_path / "bf16"
    assert (
        cli.main(
            ["export", str(trained.output_dir), str(out), "--dtype", "bfloat16", "--max-shard-size", "4MB"]
        )
        == 0
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for (
        name
    ) in files:  # only a tensor bigger than the limit (the 6.3 MB embedding) gets a bigger file of its own
        tensors = load_file(out / name)
        assert (out / name).stat().st_size <= 4_000_000 + 10_000 or len(tensors) == 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, consolidated[name].to(torch.bfloat16)), name
    assert cli.main(["export", str(trained.output_dir), str(out)]) == 1  # exists: --overwrite to replace it
