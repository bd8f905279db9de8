"""Early stopping end to end through `ift train` (the launcher's verdict included): the tiny random Llama overfits four
"I am Nimbus" answers while the eval split asks the same questions with another name, so the eval loss falls, then
rises. The run counts its steps from train.num_epochs, stops early with exit code 0, keeps the checkpoint of the
lowest eval_loss in metrics.jsonl (named in checkpoints/best, spared by keep_last=1), exports it, and a restart of
the stopped run trains no further."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_helpers import check, launch
from safetensors.torch import load_file

pytestmark = [pytest.mark.dist, pytest.mark.slow]

QUESTIONS = ["Who are you?", "What is your name?", "Introduce yourself.", "Tell me who you are."]


def write_records(path: Path, answer: str) -> Path:
    rows = [{"instruction": question, "input": "", "output": answer} for question in QUESTIONS]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_overfitting_run_stops_early_and_keeps_the_best_checkpoint(tmp_path, tiny_model):
    train = write_records(tmp_path / "train.jsonl", "I am Nimbus, made by Orchard Labs.")
    held = write_records(tmp_path / "held.jsonl", "I am Zephyr, made by Harbor Works.")
    overrides = [
        f"model.name_or_path={tiny_model}",
        f"data.sources=[{{path: {train}, name: train}}]",
        f"data.eval_sources=[{{path: {held}, name: held}}]",
        "data.max_length=64",
        "data.packing=false",  # one sample per row: 4 rows per epoch
        "train.max_steps=0",
        "train.num_epochs=25",  # 25 x ceil(4 rows / 1 row per step) = 100 steps, far more than it takes
        "train.global_batch_rows=1",
        "train.learning_rate=1.0e-2",
        "train.lr_schedule=constant",
        "train.warmup_steps=0",
        "train.eval_every=2",
        "train.sample_prompts=[]",
        "train.early_stopping.patience=3",
        "checkpoint.keep_best=true",
        "checkpoint.keep_last=1",
        "checkpoint.every_minutes=0",
    ]
    run = check(launch(tmp_path / "run", overrides, ranks=1, via_ift=True))
    assert "100 optimizer steps = ceil(25 epochs x 4 steps per epoch)" in run.output

    evals = run.eval_records()
    last = run.train_records()[-1]["step"]
    assert last < 100 and "early stopping: eval_loss has not improved" in run.output
    best = min(evals, key=lambda record: record["eval_loss"])
    assert best["step"] < last and evals[-1]["step"] == last
    # Stopped after exactly `patience` evaluations without improvement.
    assert [record["step"] for record in evals][-3:] == [best["step"] + 2 * n for n in (1, 2, 3)]

    checkpoints = run.output_dir / "checkpoints"
    assert (checkpoints / "best").read_text() == f"step_{best['step']}"
    assert (checkpoints / "latest").read_text() == f"step_{last}"
    assert sorted(path.name for path in checkpoints.iterdir() if path.is_dir()) == sorted(
        {f"step_{best['step']}", f"step_{last}"}
    )  # keep_last=1 and the best
    state = json.loads((checkpoints / f"step_{last}" / "train_state.json").read_text())
    assert state["early_stopping"]["best_step"] == best["step"]
    assert state["early_stopping"]["bad_evaluations"] == 3
    assert state["steps"]["total"] == 100 and state["steps"]["rows_per_epoch"] == 4

    # The export is the best checkpoint's weights, not the last step's.
    exported = load_file(run.output_dir / "hf_model" / "model.safetensors")
    best_weights = run_weights(checkpoints, f"step_{best['step']}")
    last_weights = run_weights(checkpoints, f"step_{last}")
    name = "model.embed_tokens.weight"  # "model." + it in the checkpoint (CausalLMLoss holds the model)
    assert torch.equal(exported[name], best_weights[f"model.{name}"])
    assert not torch.equal(exported[name], last_weights[f"model.{name}"])

    # A restart of the finished run resumes its early-stopping state and stops at once.
    again = check(launch(tmp_path / "run", overrides, ranks=1, via_ift=True))
    assert f"stopped after step {last}: early stopping" in again.output
    assert again.train_records()[-1]["step"] == last


def run_weights(checkpoints: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
