"""A short training run configured like the demo (configs/demo_cpu.yaml's system prompt, checkpoint and export
settings; the tiny model stands in for SmolLM2-135M) keeps what it trained: its final checkpoint, complete and the only
one, and the Hugging Face export, whose tokenizer prompts without SmolLM2's default system prompt; the chat command
the run prints answers with that export."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

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
    "eval.at_start",
    "eval.benchmarks",
)


@pytest.fixture(scope="module")
def demo_like(dist_dir, tiny_model) -> Run:
    demo = flatten(to_dict(load_config(DEMO_CONFIG)))
    overrides = [f"{key}={json.dumps(demo[key])}" for key in DEMO_KEYS]  # JSON values are YAML values
    overrides += [f"model.name_or_path={tiny_model}", "train.max_steps=2", "train.sample_max_new_tokens=4"]
    # data.quality under 2 ranks: rank 0 decides, both apply (FastChat's dummy set has near-duplicate templates)
    overrides += ["data.quality.dedup.exact=true", "data.quality.dedup.near=true"]
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


def predictions(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "predictions.jsonl").read_text().splitlines()]


def test_mmlu_is_scored_before_and_after_training(demo_like):
    subset = load_config(DEMO_CONFIG).eval.benchmarks[0]
    questions = len(subset.subjects) * subset.limit
    records = [record for record in demo_like.records() if "eval/mmlu/acc" in record]
    assert [record["step"] for record in records] == [0, 2]
    assert [record["eval/mmlu/questions"] for record in records] == [questions, questions]
    before, after = (predictions(demo_like.output_dir / "eval" / f"step_{step}" / "mmlu") for step in (0, 2))
    assert [p["id"] for p in before] == [p["id"] for p in after] and len(before) == questions
    assert [p["scores"] for p in before] != [p["scores"] for p in after]  # scored with the trained weights
    assert re.search(r"step 0: mmlu acc \d\.\d{4}", demo_like.output)
    assert re.search(r"step 2: mmlu acc \d\.\d{4}", demo_like.output)


@pytest.mark.e2e
@pytest.mark.parametrize("ranks, source", [(1, "hf_model"), (2, "checkpoints/step_2")])
def test_ift_eval_mc_equals_the_scores_of_training(demo_like, ranks, source, tmp_path):
    """ZeRO-3 scoring on the training ranks == `ift eval mc` on that step's weights (the export, or the checkpoint
    exported on the fly), on 1 rank and on 2: the same predictions, the same scores."""
    subset = load_config(DEMO_CONFIG).eval.benchmarks[0]
    out = tmp_path / "mmlu"
    command = [str(Path(sys.executable).with_name("ift")), "eval", "mc", str(demo_like.output_dir / source)]
    command += ["--benchmark", "mmlu", "--subjects", *subset.subjects, "--limit", str(subset.limit)]
    command += ["--out", str(out), "--num-gpus", str(ranks)]
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400, env=environment)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    total = len(subset.subjects) * subset.limit
    assert re.search(rf"^\| \*\*all\*\* \| {total} \| \d\.\d{{4}} \|", result.stdout, re.M), result.stdout
    trained = predictions(demo_like.output_dir / "eval" / "step_2" / "mmlu")
    scored = predictions(out)
    assert [p["id"] for p in scored] == [p["id"] for p in trained]
    assert [p["predicted"] for p in scored] == [p["predicted"] for p in trained]
    for ours, theirs in zip(scored, trained, strict=True):
        assert ours["scores"] == pytest.approx(theirs["scores"], abs=1e-4), ours["id"]
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["acc"] == pytest.approx(
        next(r for r in demo_like.records() if r.get("step") == 2 and "eval/mmlu/acc" in r)["eval/mmlu/acc"]
    )
    # the on-the-fly export is removed again
    assert not list((demo_like.output_dir).glob(".eval-*"))


@pytest.mark.e2e
def test_data_quality_decided_in_training_equals_ift_data_stats(demo_like):
    """The removals rank 0 wrote at the start of training are exactly those `ift data stats` finds on the run's
    config in one process: the kept set does not depend on ranks."""
    quality = demo_like.output_dir / "quality"
    counts = json.loads((quality / "quality.json").read_text())["removed"]
    removed = [json.loads(line) for line in (quality / "removed.jsonl").read_text().splitlines()]
    assert removed and sum(n for source in counts.values() for n in source.values()) == len(removed)
    assert {r["reason"] for r in removed} <= {"duplicate", "near_duplicate"}
    assert "data.quality removed" in demo_like.output
    command = [
        str(Path(sys.executable).with_name("ift")),
        "data",
        "stats",
        str(demo_like.output_dir / "config.yaml"),
    ]
    result = subprocess.run([*command, "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["quality"]["removals"] == removed
