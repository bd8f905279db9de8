"""Run metrics: the FLOPs formula by hand, parameter counting (tied, ZeRO-3 shards), metrics.jsonl (no NaN in JSON),
samples.jsonl, and W&B offline runs that keep their id."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_model import tiny_llama

from ift_dist.config import WandbConfig
from ift_dist.metrics import (
    FlopsModel,
    RunLogger,
    _numel,
    finite_or_none,
    flops_model,
    peak_flops,
    start_wandb,
)


def test_step_flops_are_six_n_per_token_plus_causal_attention_per_sample():
    model = FlopsModel(matmul_parameters=1000, layers=2, attention_width=8)
    # samples of 3 and 5 tokens: 6 x 1000 x 8 + 6 x 2 x 8 x (9 + 25)
    assert model.flops([3, 5]) == 6 * 1000 * 8 + 6 * 2 * 8 * 34
    assert model.flops([8]) > model.flops([3, 5])  # one long sample attends more than two short ones


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_matmul_parameters_leave_out_the_embedding_lookup_only(tied):
    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2}
    # attention width 4 x 8 = 32, not the hidden size
    model = tiny_llama(vocab_size=100, num_hidden_layers=3, head_dim=8, tie_word_embeddings=tied, **sizes)
    total = sum(p.numel() for p in model.parameters())
    embedding = 100 * 16
    flops = flops_model(model)
    # untied: the input embedding is a lookup; tied: the one matrix is also the output layer, a matmul
    assert flops.matmul_parameters == (total if tied else total - embedding)
    assert (flops.layers, flops.attention_width) == (3, 32)


def test_a_zero3_shard_counts_with_its_full_size():
    shard = torch.nn.Parameter(torch.empty(0))
    shard.ds_numel = 12
    assert _numel(shard) == 12 and _numel(torch.nn.Parameter(torch.ones(2, 3))) == 6


def test_peak_flops_from_the_override_and_none_on_cpu():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), override_tflops=100.0) == pytest.approx(1e14)


def test_non_finite_numbers_become_null():
    assert [finite_or_none(v) for v in (math.nan, math.inf, -math.inf, 1.5, 3, None)] == [
        None,
        None,
        None,
        1.5,
        3,
        None,
    ]


def step_record(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-5, "grad_norm": loss, "tokens_per_second": 10.0}


def test_run_logger_writes_one_json_object_per_step_and_eval(tmp_path):
    log = RunLogger(tmp_path, enabled=True, max_steps=3)
    log.step(step_record(1, 2.5))
    log.step(step_record(2, math.nan))
    log.eval({"step": 2, "eval_loss": 2.0, "eval_perplexity": math.exp(2.0), "eval_tokens": 10})
    log.samples(2, "after", [("Who are you?", "Nimbus.")])
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: no NaN tokens
    assert [r["step"] for r in records] == [1, 2, 2]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None
    assert records[2]["eval_loss"] == 2.0
    sample = json.loads((tmp_path / "samples.jsonl").read_text())
    assert sample == {"step": 2, "when": "after", "prompt": "Who are you?", "answer": "Nimbus."}


def test_other_ranks_write_nothing(tmp_path):
    log = RunLogger(tmp_path, enabled=False, max_steps=3, wandb=WandbConfig(mode="offline"))
    log.step(step_record(1, 2.5))
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_wandb_offline_run_is_resumed_with_its_stored_id(tmp_path):
    config = WandbConfig(mode="offline", project="ift-dist-test", tags=["unit"])
    first = start_wandb(config, tmp_path, {"train": {"learning_rate": 1e-5}})
    first.log({"train/loss": 1.0}, step=1)
    first.finish()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert first.id == run_id
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 1
    second = start_wandb(config, tmp_path, {"train": {"learning_rate": 1e-5}}, start_step=1)
    assert second.id == run_id  # a resumed run continues the same W&B run
    second.finish()
    assert start_wandb(WandbConfig(mode="disabled"), tmp_path, {}) is None


def test_the_progress_bar_shows_each_step_with_its_own_loss(tmp_path, capsys):
    log = RunLogger(tmp_path, enabled=True, max_steps=3)
    log.bar.mininterval = log.bar.miniters = 0  # redraw at every update, as a terminal does between steps
    for step, loss in ((1, 5.0), (2, 4.0), (3, 3.0)):
        log.step(step_record(step, loss))
    log.close()
    drawn = capsys.readouterr().err.replace("\r", "\n").splitlines()
    for step, loss in ((1, "5.0000"), (2, "4.0000"), (3, "3.0000")):
        lines = [line for line in drawn if f"| {step}/3 [" in line]
        assert lines and all(f"loss={loss}" in line for line in lines), lines
