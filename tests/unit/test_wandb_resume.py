"""W&B after a resume: the stored run is rewound to the resume step (resume_from), a start from step 0 is a new run,
a server that cannot rewind falls back to continuing the run; real wandb in offline mode, read back from the run's
transaction log (no network)."""

from __future__ import annotations

import logging
import struct
import time
from pathlib import Path

import pytest

from ift_dist.config import WandbConfig
from ift_dist.metrics import start_wandb, wandb_init_arguments

wandb = pytest.importorskip("wandb")

OFFLINE = WandbConfig(mode="offline", project="ift-dist-test")


def test_init_arguments_new_run_resume_and_rewind(tmp_path):
    fresh = wandb_init_arguments(OFFLINE, tmp_path, {}, run_id=None, start_step=0)
    assert "id" not in fresh and "resume" not in fresh and "resume_from" not in fresh
    assert fresh["name"] == tmp_path.name and fresh["dir"] == str(tmp_path)
    # Starting over from step 0 is a new W&B run, not the stored one.
    assert "id" not in wandb_init_arguments(OFFLINE, tmp_path, {}, run_id="abc", start_step=0)
    resumed = wandb_init_arguments(OFFLINE, tmp_path, {"seed": 1}, run_id="abc", start_step=3)
    assert resumed["id"] == "abc" and resumed["resume_from"] == "abc?_step=3" and "resume" not in resumed
    assert resumed["config"] == {"seed": 1}
    kept = WandbConfig(mode="offline", rewind_on_resume=False)
    appended = wandb_init_arguments(kept, tmp_path, {}, run_id="abc", start_step=3)
    assert appended["id"] == "abc" and appended["resume"] == "allow" and "resume_from" not in appended


def transaction_log(path: Path) -> list:
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB's log format (32 KiB
    blocks of chunks, each with crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    position, parts, records = 7, [], []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if position + 7 + length > len(data):  # still being written
            break
        parts.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def logged(run_dir: Path) -> tuple[list, list[int]]:
    """(the run records, the _step of every history row) of one offline run directory."""
    # wandb's service process may close the file a moment after finish() returns: wait for the final exit record.
    deadline = time.monotonic() + 30
    while True:
        records = transaction_log(next(run_dir.glob("run-*.wandb")))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    steps = [
        int(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
        if (item.key or "/".join(item.nested_key)) == "_step"  # wandb-core writes nested_key
    ]
    return runs, steps


def test_a_resumed_offline_run_is_rewound_to_the_checkpoint_step(tmp_path):
    first = start_wandb(OFFLINE, tmp_path, {})
    for step in range(1, 6):  # steps 4 and 5 are lost with the interrupted attempt: the checkpoint is at 3
        first.log({"train/loss": float(step)}, step=step)
    first.finish()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    second = start_wandb(OFFLINE, tmp_path, {}, start_step=3)
    assert second.id == run_id
    for step in range(4, 7):
        second.log({"train/loss": 10.0 + step}, step=step)
    second.finish()
    earlier, later = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}*"))
    runs, steps = logged(earlier)
    assert steps == [1, 2, 3, 4, 5] and not runs[0].HasField("branch_point")
    runs, steps = logged(later)
    # `wandb sync` of both directories rewinds the run to step 3, then adds 4, 5, 6 again.
    point = runs[0].branch_point
    assert (point.run, point.metric, point.value) == (run_id, "_step", 3)
    assert steps == [4, 5, 6]


def test_a_start_from_step_zero_is_a_new_run(tmp_path, caplog):
    first = start_wandb(OFFLINE, tmp_path, {})
    first.finish()
    with caplog.at_level(logging.INFO, logger="ift_dist.metrics"):
        second = start_wandb(OFFLINE, tmp_path, {}, start_step=0)
    second.finish()
    assert second.id != first.id
    assert (tmp_path / "wandb_run_id").read_text().strip() == second.id
    assert f"run {first.id} keeps its history" in caplog.text


def test_a_server_that_cannot_rewind_continues_the_run_with_a_warning(tmp_path, monkeypatch, caplog):
    first = start_wandb(OFFLINE, tmp_path, {})
    first.finish()
    real_init, calls = wandb.init, []

    def server_without_rewind(**arguments):  # the network edge: the server's answer to a rewind request
        calls.append(arguments)
        if "resume_from" in arguments:
            raise wandb.errors.CommError("failed to rewind run: run not found")
        return real_init(**arguments)

    monkeypatch.setattr(wandb, "init", server_without_rewind)
    with caplog.at_level(logging.WARNING, logger="ift_dist.metrics"):
        second = start_wandb(OFFLINE, tmp_path, {}, start_step=2)
    second.finish()
    assert second.id == first.id
    assert calls[1]["resume"] == "allow" and calls[1]["id"] == first.id and "resume_from" not in calls[1]
    assert f"could not rewind run {first.id} to step 2" in caplog.text
