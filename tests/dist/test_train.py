"""The real `deepspeed` command end to end on 2 CPU ranks (ZeRO-3, gloo): one shared run, several assertions; and a
1-rank run that must leave no /dev/shm segment either."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from dist_helpers import check, launch
from transformers import AutoModelForCausalLM

from ift_dist.config import load_config
from ift_dist.optim import learning_rate

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEP_KEYS = {
    "step",
    "loss",
    "lr",
    "grad_norm",
    "skipped",
    "tokens",
    "supervised_tokens",
    "samples",
    "rows",
    "packing_efficiency",
    "tokens_per_second",
    "mfu",
    "memory_gb",
    "step_seconds",
    "epoch",
}


def test_one_metrics_record_per_optimizer_step(main_run):
    records = main_run.train_records()
    assert [record["step"] for record in records] == [1, 2, 3]
    for record in records:
        assert set(record) == STEP_KEYS
        assert math.isfinite(record["loss"]) and record["loss"] > 0 and not record["skipped"]
        assert record["grad_norm"] > 0
        assert record["rows"] == 4  # global batch: 1 row x 2 ranks x 2 accumulation steps
        assert 0 < record["supervised_tokens"] < record["tokens"] <= 4 * 256
        assert record["packing_efficiency"] == pytest.approx(record["tokens"] / (4 * 256))
        assert record["tokens_per_second"] > 0 and record["memory_gb"] > 0
        assert record["mfu"] is None  # no GPU, no peak FLOP/s
    # The model learns: the loss falls (random init, lr 1e-3, the same kind of data each step).
    assert records[-1]["loss"] < records[0]["loss"]


def test_learning_rate_is_the_schedule_of_the_step(main_run):
    config = load_config(main_run.output_dir / "config.yaml")
    assert [record["lr"] for record in main_run.train_records()] == [
        pytest.approx(learning_rate(step, config.train)) for step in range(3)
    ]


def test_eval_every_n_steps_and_at_the_end(main_run):
    evals = main_run.eval_records()
    assert [record["step"] for record in evals] == [2, 3]
    for record in evals:
        assert record["eval_perplexity"] == pytest.approx(math.exp(record["eval_loss"]))
        assert record["eval_tokens"] > 0
    assert evals[0]["eval_tokens"] == evals[1]["eval_tokens"]  # the whole split each time, over both ranks


def test_resolved_config_is_saved(main_run, tiny_model):
    config = load_config(main_run.output_dir / "config.yaml")
    assert config.model.name_or_path == str(tiny_model)
    assert config.train.loss == "fused" and config.train.max_steps == 3
    assert config.output_dir == str(main_run.output_dir)


def test_wandb_offline_run_directory_carries_the_stored_run_id(main_run):
    run_id = (main_run.output_dir / "wandb_run_id").read_text().strip()
    assert re.fullmatch(r"[a-z0-9]+", run_id)
    runs = list((main_run.output_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and (runs[0] / f"run-{run_id}.wandb").is_file()


def test_sample_prompts_are_answered_before_and_after_training(main_run):
    import json

    lines = (main_run.output_dir / "samples.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    assert [(sample["when"], sample["step"], sample["prompt"]) for sample in samples] == [
        ("before", 0, "Who are you?"),
        ("after", 3, "Who are you?"),
    ]
    assert "[after training] 'Who are you?'" in main_run.output


def test_rank_zero_reports_and_other_ranks_stay_quiet(main_run):
    assert "[rank 0] INFO" in main_run.output
    assert "first training sample:" in main_run.output and "[[" in main_run.output  # supervised part marked
    quiet = [line for line in main_run.output.splitlines() if line.startswith("[rank 1]")]
    assert quiet == []


def test_checkpoint_holds_the_trained_weights(main_run, tiny_model):
    weights = main_run.weights()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    assert weights.keys() >= {f"model.{name}" for name in initial}
    changed = [name for name in initial if not torch.equal(weights[f"model.{name}"], initial[name])]
    assert len(changed) == len(initial)  # every parameter trained (norm weights included)


def shm_segments() -> set[str]:
    return {path.name for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def test_no_shared_memory_segment_is_left_behind(main_run):
    """DeepSpeed's CPU shared-memory allreduce never unlinks its 66 MB /dev/shm segment per rank; the engine unlinks
    them once every rank has mapped them (engine._unlink_shm_allreduce_segment), or each run would leak them."""
    assert "deepspeed_shm_comm" in main_run.output or "shm" in main_run.output.lower()
    leftovers = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{main_run.port}_*"))
    assert leftovers == []


def test_no_shared_memory_segment_is_left_behind_by_one_rank(dist_dir, tiny_model):
    """One rank too: DeepSpeed's launcher sets LOCAL_SIZE = 1 = the world size, so the shm op makes its segment."""
    before = shm_segments()
    overrides = [f"model.name_or_path={tiny_model}", "train.max_steps=1", "train.global_batch_rows=1"]
    overrides += [
        "train.eval_every=0",
        "data.eval_sources=[]",
        "train.sample_prompts=[]",
        "train.save_at_end=false",
    ]
    run = check(launch(dist_dir / "one_rank_shm", overrides, ranks=1))
    assert "deepspeed_shm_comm" in run.output  # the op was built and loaded, so the segment was made
    assert {name for name in shm_segments() - before if f"_{run.port}_" in name} == set()
