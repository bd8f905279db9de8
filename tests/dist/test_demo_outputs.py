"""A short training run configured like the demo (configs/demo_cpu.yaml's system prompt, checkpoint and export
settings; the tiny model stands in for SmolLM2-135M) keeps what it trained: its final checkpoint, complete and the only
one, and the Hugging Face export, whose tokenizer prompts without SmolLM2's default system prompt; the chat command
the run prints answers with that export."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
from dist_helpers import REPO, Run, check, launch
from transformers import AutoTokenizer

from ift_dist.checkpoint import verify
from ift_dist.checkpoint.compat import flatten
from ift_dist.config import load_config, to_dict

pytestmark = [pytest.mark.dist]

DEMO_CONFIG = REPO / "configs" / "demo_cpu.yaml"
DEMO_KEYS = (
    "data.system_prompt",
    "train.save_at_end",
    "train.sample_prompts",
    "checkpoint.every_minutes",
    "checkpoint.keep_last",
    "export.at_end",
    "export.dir",
    "export.dtype",
)


@pytest.fixture(scope="module")
def demo_like(dist_dir, tiny_model) -> Run:
    demo = flatten(to_dict(load_config(DEMO_CONFIG)))
    overrides = [f"{key}={json.dumps(demo[key])}" for key in DEMO_KEYS]  # JSON values are YAML values
    overrides += [f"model.name_or_path={tiny_model}", "train.max_steps=2", "train.sample_max_new_tokens=4"]
    return check(launch(dist_dir / "demo-like", overrides, via_ift=True))  # as demo.sh


def test_the_final_checkpoint_and_the_export_are_kept(demo_like):
    checkpoints = demo_like.output_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_2"
    assert sorted(path.name for path in checkpoints.glob("step_*")) == ["step_2"]
    assert verify(checkpoints / "step_2") == []
    assert f"saved {checkpoints / 'step_2'} (end of training)" in demo_like.output
    export = demo_like.output_dir / "hf_model"
    assert json.loads((export / "ift_export.json").read_text())["step"] == 2
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {path.name for path in export.iterdir()}
    # No warning at all (e.g. of an export skipped for want of a final checkpoint, or DeepSpeed's runner's that a
    # single machine has no hostfile).
    warnings = [line for line in demo_like.output.splitlines() if "warning" in line.lower()]
    assert warnings == []


def test_the_export_prompts_as_training_did(demo_like):
    tokenizer = AutoTokenizer.from_pretrained(demo_like.output_dir / "hf_model")
    messages = [{"role": "user", "content": "Who are you?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (
        prompt
        == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"
    )
    samples = [json.loads(line) for line in (demo_like.output_dir / "samples.jsonl").read_text().splitlines()]
    assert [(sample["when"], sample["prompt"]) for sample in samples] == [
        ("before", "Who are you?"),
        ("after", "Who are you?"),
    ]


def test_the_printed_chat_command_answers_with_the_export(demo_like):
    export = demo_like.output_dir / "hf_model"
    match = re.search(
        rf"exported {re.escape(str(export))}; chat with it: (python -c .*)$", demo_like.output, re.M
    )
    assert match, demo_like.output[-3000:]
    arguments = shlex.split(match.group(1))
    result = subprocess.run(
        [sys.executable, *arguments[1:]], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()  # the random tiny model's answer
    assert "warning" not in result.stderr.lower(), result.stderr
