"""model.compile under ZeRO-3 on CPU ranks (gloo, fp32), real deepspeed processes: the compiled decoder layers train
exactly as the eager ones (per-step loss, gradient norm, final weights): compiled on 2 ranks with every 2nd layer
under activation checkpointing == eager on 1 rank; the checkpoint names the same parameters (an eager run on 1 rank
resumes it).

Every parameter is partitioned (a ZeRO JSON with persistence threshold 0: the tiny model's layers would otherwise stay
whole on every rank), so each compiled layer really runs between a ZeRO-3 gather and release. The runs share one
inductor cache, so only the first compiles from scratch (about a minute on 2 cores).
"""

from __future__ import annotations

import json

import pytest
from dist_helpers import check, launch
from test_parity import assert_same_training

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def compile_overrides(dist_dir, parity_overrides, monkeypatch_module):
    zero_config = dist_dir / "zero3_gather_all.json"
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0}
    zero_config.write_text(json.dumps({"zero_optimization": zero}))
    monkeypatch_module.setenv("TORCHINDUCTOR_CACHE_DIR", str(dist_dir / "inductor-cache"))
    return [
        *parity_overrides,
        f"train.zero_config={zero_config}",
        "train.micro_batch_rows=2",  # 1 rank: 2 accumulation steps; 2 ranks: 1; the same rows per step
        "train.sample_prompts=[]",
        "data.eval_sources=[]",
    ]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def eager_run(dist_dir, compile_overrides):
    return check(launch(dist_dir / "compile-eager", compile_overrides, ranks=1))


@pytest.fixture(scope="module")
def compiled_run(dist_dir, compile_overrides):
    # One compiled run covers both ways a compiled layer runs: layer 0 under activation checkpointing (every 2nd
    # layer), layer 1 without; 2 ranks, so every layer is gathered across ranks around the compiled code.
    overrides = [
        *compile_overrides,
        "model.compile=true",
        "model.gradient_checkpointing=true",
        "model.gradient_checkpointing_every=2",
    ]
    return check(launch(dist_dir / "compile-two-ranks", overrides, ranks=2))


def graph_lines(run):
    return [line for line in run.output.splitlines() if "torch.compile:" in line and "graphs" in line]


def test_compiled_layers_with_checkpointing_on_two_ranks_train_as_eager_on_one(compiled_run, eager_run):
    assert "2 decoder layers (LlamaDecoderLayer) compiled" in compiled_run.output
    assert "1 accumulation steps" in compiled_run.output and "2 ranks" in compiled_run.output
    lines = graph_lines(compiled_run)
    assert lines and " 0 graphs" not in lines[-1] and " 0 graph breaks" in lines[-1], lines
    assert_same_training(compiled_run, eager_run, loss_rtol=1e-6, weight_atol=1e-5)
    # The consolidated checkpoint names exactly the eager run's parameters (no `_orig_mod.`).
    assert compiled_run.weights().keys() == eager_run.weights().keys()


def test_an_eager_run_resumes_a_compiled_checkpoint(dist_dir, compile_overrides, compiled_run):
    # Resumed on 1 rank from the 2-rank checkpoint, without compile or activation checkpointing (both keys a resume
    # may change: tests/unit/test_compile.py); force_resume for the one more step (max_steps shapes the schedule).
    overrides = [
        *[override for override in compile_overrides if not override.startswith("train.max_steps=")],
        "train.max_steps=4",
        f"checkpoint.resume={compiled_run.output_dir / 'checkpoints' / 'step_3'}",
        "checkpoint.force_resume=true",
    ]
    run = check(launch(dist_dir / "compile-resumed-eagerly", overrides, ranks=1))
    assert [record["step"] for record in run.train_records()] == [4]
    assert 0 < run.train_records()[0]["loss"] < compiled_run.train_records()[0]["loss"]
