"""Checkpoint files without processes: the completion marker and what `verify` finds wrong, `latest`, retention,
resume discovery (newest complete, damaged ones skipped with a warning), the config changes a resume allows, and the
resumable pieces (counters, random generators, metrics.jsonl). The save protocol itself runs in tests/dist/."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ift_dist.checkpoint import compat, discovery, protocol, run_dir, state
from ift_dist.checkpoint.atomic import write_atomic
from ift_dist.config import Config, ConfigError, load_config, to_dict

WORLD_SIZE = 2


def make_checkpoint(checkpoints: Path, step: int, *, config: Config | None = None) -> Path:
    """A checkpoint directory as rank 0 leaves it after a save of WORLD_SIZE ranks (shards are stand-in bytes: the
    marker and discovery do not read them)."""
    directory = checkpoints / f"step_{step}"
    directory.mkdir(parents=True)
    written = []
    for rank in range(WORLD_SIZE):
        shard = directory / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        shard.write_bytes(bytes(range(256)) * (step + rank + 1))
        written.append(shard)
        torch.save({"rank": rank, "step": step}, run_dir.rank_file(directory, "loader", rank))
        written.append(run_dir.rank_file(directory, "loader", rank))
    progress = state.Progress(step=step, tokens=100 * step)
    train_state = state.train_state(progress, config or Config(), epoch=0)
    train_state["world_size"] = WORLD_SIZE
    (directory / run_dir.TRAIN_STATE).write_text(json.dumps(train_state, default=str))
    written.append(directory / run_dir.TRAIN_STATE)
    files = protocol.describe_files(directory, written, checksums=True)
    protocol.commit(directory, files, train_state, checksums=True)
    return directory


# ------------------------------------------------------------------------------------------------ marker, latest


def test_a_committed_checkpoint_verifies_and_becomes_latest(tmp_path):
    directory = make_checkpoint(tmp_path, 4)
    assert protocol.verify(directory) == []
    assert (tmp_path / run_dir.LATEST).read_text() == "step_4"
    marker = json.loads((directory / run_dir.MARKER).read_text())
    assert marker["step"] == 4 and marker["world_size"] == WORLD_SIZE
    shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert marker["files"][shard]["size"] == (directory / shard).stat().st_size
    assert len(marker["files"][shard]["sha256"]) == 64
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary files were renamed


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda d: (d / run_dir.MARKER).unlink(), "no completion marker complete.json"),
        (lambda d: (d / "loader_rank_00001.pt").unlink(), "loader_rank_00001.pt is missing"),
        (
            lambda d: (d / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"cut"),
            "zero_pp_rank_1_mp_rank_00_optim_states.pt has 3 bytes, the marker says 1536 (truncated",
        ),
        (
            lambda d: flip_a_byte(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
            "zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its SHA-256 in the marker (corrupted)",
        ),
        (lambda d: (d / run_dir.MARKER).write_text("{"), "unreadable completion marker"),
    ],
    ids=["no-marker", "missing", "truncated", "corrupted", "bad-marker"],
)
def test_verify_names_what_is_wrong(tmp_path, damage, expected):
    directory = make_checkpoint(tmp_path, 4)
    damage(directory)
    problems = protocol.verify(directory)
    assert len(problems) == 1 and expected in problems[0]


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksums_are_shared_out_over_ranks(tmp_path):
    """Rank r hashes files r, r + W, ...: together the ranks find a corrupted file whichever it is."""
    directory = make_checkpoint(tmp_path, 4)
    flip_a_byte(directory / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    found = [protocol.verify(directory, rank=rank, world_size=3) for rank in range(3)]
    assert sum(len(problems) for problems in found) == 1
    assert protocol.verify(directory, checksums=False) == []  # sizes only: a flipped byte passes


def test_write_atomic_replaces_the_whole_file(tmp_path):
    path = tmp_path / "latest"
    write_atomic(path, "step_1")
    write_atomic(path, "step_22")
    assert path.read_text() == "step_22" and sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


# ------------------------------------------------------------------------------------------------ retention


def test_retention_keeps_the_last_k_and_every_jth(tmp_path):
    for step in (2, 4, 6, 8, 10, 12):
        make_checkpoint(tmp_path, step)
    deleted = protocol.apply_retention(tmp_path, keep_last=2, keep_every=4)
    assert sorted(run_dir.step_of(path) for path in deleted) == [
        2,
        6,
    ]  # the last 2: 10, 12; every 4th: 4, 8
    assert sorted(run_dir.step_of(path) for path in tmp_path.glob("step_*")) == [4, 8, 10, 12]


def test_retention_removes_unfinished_older_saves_but_never_newer_ones(tmp_path):
    make_checkpoint(tmp_path, 4)
    (tmp_path / "step_3").mkdir()  # a crash while saving step 3
    (tmp_path / "step_6").mkdir()  # a crash while saving step 6 (then a resume from step 4)
    assert protocol.apply_retention(tmp_path, keep_last=0, keep_every=0) == [tmp_path / "step_3"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_4", "step_6"]


# ------------------------------------------------------------------------------------------------ discovery


def test_resume_takes_the_newest_complete_checkpoint_and_warns_about_the_others(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints, 2)
    make_checkpoint(checkpoints, 4)
    flip_a_byte(make_checkpoint(checkpoints, 6) / "loader_rank_00001.pt")
    (checkpoints / "step_8").mkdir()  # killed during its save
    found = discovery.find_resume("auto", tmp_path)
    assert found.path == checkpoints / "step_4" and found.step == 4 and found.world_size == WORLD_SIZE
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert "step_8: no completion marker" in warnings[0]
    assert "step_6: loader_rank_00001.pt does not match its SHA-256" in warnings[1]


def test_resume_settings(tmp_path):
    assert discovery.find_resume("auto", tmp_path) is None  # a new run
    make_checkpoint(tmp_path / "checkpoints", 2)
    make_checkpoint(tmp_path / "checkpoints", 4)
    assert discovery.find_resume("never", tmp_path) is None
    assert discovery.find_resume(str(tmp_path), tmp_path / "elsewhere").step == 4  # a run directory
    assert discovery.find_resume(str(tmp_path / "checkpoints" / "step_2"), tmp_path).step == 2
    (tmp_path / "checkpoints" / "step_2" / run_dir.MARKER).unlink()
    with pytest.raises(protocol.CheckpointError, match="no complete checkpoint there"):
        discovery.find_resume(str(tmp_path / "checkpoints" / "step_2"), tmp_path)


# ------------------------------------------------------------------------------------------------ config changes


def test_config_changes_that_alter_the_run_are_refused_with_their_keys(tmp_path):
    base = ["model.name_or_path=m", "train.max_steps=10"]
    directory = make_checkpoint(tmp_path, 2, config=load_config(overrides=base))
    found = discovery.Resume(directory, json.loads((directory / run_dir.TRAIN_STATE).read_text()))
    safe = [
        "train.eval_every=5",
        "tracking.wandb.mode=offline",
        "checkpoint.every_steps=3",
        "data.num_workers=4",
    ]
    compat.check_config(found, load_config(overrides=base + safe))  # nothing refused
    changed = load_config(overrides=[*base, "data.max_length=512", "seed=3"])
    with pytest.raises(ConfigError) as error:
        compat.check_config(found, changed)
    assert "data.max_length: 2048 -> 512; seed: 0 -> 3" in str(error.value)
    assert "checkpoint.force_resume=true" in str(error.value)
    compat.check_config(found, load_config(overrides=[*base, "seed=3", "checkpoint.force_resume=true"]))


def test_config_changes_compare_nested_keys():
    old = to_dict(Config())
    new = to_dict(
        load_config(overrides=["train.learning_rate=1e-4", "output_dir=moved", "export.dtype=bfloat16"])
    )
    refused, allowed = compat.config_changes(old, new)
    assert refused == ["train.learning_rate"]
    assert allowed == ["export.dtype", "output_dir"]


# ------------------------------------------------------------------------------------------------ resumable state


def test_progress_counts_steps_and_bad_steps_in_a_row():
    progress = state.Progress()
    for skipped in (False, True, True):
        progress.update(tokens=10, supervised_tokens=4, samples=2, skipped=skipped)
    assert progress.state_dict() == {
        "step": 3,
        "tokens": 30,
        "supervised_tokens": 12,
        "samples": 6,
        "bad_in_a_row": 2,
    }
    again = state.Progress()
    again.load_state_dict(progress.state_dict())
    assert again == progress


def test_random_generators_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    path = tmp_path / "rng.pt"
    torch.save(state.rng_state(), path)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state.set_rng_state(torch.load(path, weights_only=True))
    drawn = (random.random(), np.random.rand(), torch.rand(2))
    assert drawn[:2] == expected[:2] and torch.equal(drawn[2], expected[2])


def test_truncate_metrics_drops_the_records_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7}, {"step": 3}]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    run_dir.RunDir(tmp_path).truncate_metrics(2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
