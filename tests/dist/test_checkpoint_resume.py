"""Resuming on the same world size, 2 CPU ranks, real `deepspeed` processes, training on records (so the packer's
buffer of read but unpacked samples is part of every rank's state):

- the newest checkpoint has a corrupted shard: the rerun says so, resumes from the one before, and reproduces the
  uninterrupted run's per-step loss, learning rate and token counts exactly;
- a config that would change the run is refused, naming the keys;
- a save that fails on one rank (its writes refused by the OS) stops the run with a clear error and exit code 1,
  leaving the previous checkpoint complete and `latest`.
"""

from __future__ import annotations

import json

import pytest
from checkpoint_runs import assert_same_steps, cut_back, marker, reference
from dist_helpers import check, launch

from ift_dist.exit_codes import CONFIG_ERROR, FAILED

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def records_overrides(tiny_model) -> list[str]:
    return [
        f"model.name_or_path={tiny_model}",
        "train.max_steps=6",
        "train.sample_prompts=[]",
        "data.eval_sources=[]",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=0",
        "export.at_end=false",
    ]


@pytest.fixture(scope="module")
def records_reference(dist_dir, records_overrides):
    return reference(dist_dir / "records-reference", records_overrides)


def test_every_rank_state_is_in_the_checkpoint(records_reference):
    run_dir = records_reference.output_dir
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_6"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_2", "step_4", "step_6"]
    files = marker(run_dir, 6)["files"]
    for rank in (0, 1):
        for name in (
            f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
            f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
            f"loader_rank_0000{rank}.pt",
            f"rng_rank_0000{rank}.pt",
        ):
            assert files[name]["size"] > 0 and len(files[name]["sha256"]) == 64, name
    assert {"train_state.json", "model_files/config.json", "model_files/tokenizer.json"} <= files.keys()
    state = json.loads((run_dir / "checkpoints" / "step_6" / "train_state.json").read_text())
    records = records_reference.train_records()
    assert state["step"] == 6 and state["world_size"] == 2
    assert state["tokens"] == sum(r["tokens"] for r in records)
    assert state["supervised_tokens"] == sum(r["supervised_tokens"] for r in records)
    assert state["samples"] == sum(r["samples"] for r in records)
    assert state["scheduler"]["last_lr"] == records[-1]["lr"]
    assert {"torch", "deepspeed", "transformers"} <= state["versions"].keys()
    assert len(state["config_sha256"]) == 64 and state["config"]["train"]["max_steps"] == 6


def test_a_corrupted_newest_checkpoint_is_skipped_and_the_run_resumes_exactly(
    dist_dir, records_reference, records_overrides
):
    run_dir = cut_back(records_reference, dist_dir / "records-corrupted", 6)
    shard = run_dir / "checkpoints" / "step_6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))

    refused = launch(run_dir, [*records_overrides, "data.max_length=128"], timeout=120)
    assert refused.returncode == CONFIG_ERROR, refused.output[-5000:]
    assert "in keys that change the run: data.max_length: 256 -> 128" in refused.output

    run = check(launch(run_dir, records_overrides))
    assert "skipping checkpoint" in run.output
    assert "step_6: zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its SHA-256" in run.output
    assert "resuming from" in run.output and "step_4 (step 4, 2 ranks)" in run.output
    assert_same_steps(run, records_reference, range(1, 7))  # 1-4 kept from before, 5-6 trained again
    assert marker(run_dir, 6) is not None and (run_dir / "checkpoints" / "latest").read_text() == "step_6"


def test_a_failing_save_stops_the_run_cleanly_and_keeps_the_previous_checkpoint(
    tmp_path, records_overrides, monkeypatch
):
    overrides = [*records_overrides, "train.max_steps=3", "checkpoint.every_steps=1"]
    monkeypatch.setenv("IFT_TEST_FAULT", "disk_full:2:1")  # rank 1's writes fail in the save of step 2
    run = launch(tmp_path / "disk-full", overrides)
    assert run.returncode == FAILED, run.output[-10000:]
    assert "saving checkpoint" in run.output and "step_2 failed (rank 1: ShardSaveError" in run.output
    assert "the previous checkpoints are untouched" in run.output
    checkpoints = run.output_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_1"
    assert marker(run.output_dir, 1) is not None and not (checkpoints / "step_2").exists()
    assert [record["step"] for record in run.train_records()] == [1, 2]
