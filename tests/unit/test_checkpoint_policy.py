"""When a run saves and stops (save_policy: cadence, stop signals, deadline), the export's size arithmetic, and the
config keys of both; in one process (a world of one)."""

from __future__ import annotations

import datetime
import os
import signal
import time

import pytest

from ift_dist.checkpoint.save_policy import SavePolicy, StopSignals, resolve_deadline
from ift_dist.config import CheckpointConfig, ConfigError, load_config
from ift_dist.export import parse_size, plan_shards


def policy(max_steps: int = 10, deadline: float | None = None, **options) -> SavePolicy:
    return SavePolicy(CheckpointConfig(every_minutes=0, **options), max_steps, StopSignals(), deadline)


def test_every_n_steps_saves_without_stopping():
    save_policy = policy(every_steps=3)
    decided = {step: save_policy.decide(step, 0.1) for step in range(1, 11)}
    assert [step for step, decision in decided.items() if decision.save] == [3, 6, 9]
    assert not any(decision.stop for decision in decided.values())


def test_a_stop_signal_saves_and_stops_at_the_next_boundary_but_not_after_the_last_step():
    save_policy = policy(max_steps=5)
    save_policy.signals.received.append("SIGUSR1")
    decision = save_policy.decide(2, 0.1)
    assert decision.save and decision.stop and "SIGUSR1" in decision.reason
    last = save_policy.decide(5, 0.1)  # the end of training saves anyway and the run is done
    assert not last.stop


def test_the_deadline_stops_the_run_when_one_more_step_and_a_save_would_not_fit():
    now = time.time()
    far = policy(deadline=now + 3600, deadline_margin_seconds=60)
    assert not far.decide(1, 10.0).stop
    near = policy(deadline=now + 100, deadline_margin_seconds=60)
    assert not near.decide(1, 10.0).stop  # 10 s step + 60 s margin fit in 100 s
    near.saved(45.0)  # a save takes 45 s: no longer
    decision = near.decide(2, 10.0)
    assert decision.save and decision.stop and "deadline" in decision.reason


def test_every_m_minutes_counts_from_the_last_save():
    save_policy = SavePolicy(CheckpointConfig(every_minutes=0.001), 10, StopSignals(), None)  # 60 ms
    assert not save_policy.decide(1, 0.0).save
    time.sleep(0.07)
    assert save_policy.decide(2, 0.0).save
    save_policy.saved(0.01)
    assert not save_policy.decide(3, 0.0).save


def test_stop_signals_are_recorded_not_acted_on():
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1)}
    signals = StopSignals()
    try:
        signals.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # would end the test process without the handler
        time.sleep(0.01)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    assert signals.received == ["SIGUSR1", "SIGTERM"]


def test_deadline_settings(monkeypatch):
    assert resolve_deadline(None) is None
    assert resolve_deadline("1700000000") == 1700000000.0
    moment = datetime.datetime(2030, 1, 31, 18, 0, tzinfo=datetime.UTC)
    assert resolve_deadline("2030-01-31T18:00:00+00:00") == moment.timestamp()
    monkeypatch.setenv("SLURM_JOB_END_TIME", "1900000000")
    assert resolve_deadline("slurm") == 1900000000.0
    monkeypatch.delenv("SLURM_JOB_END_TIME")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert resolve_deadline("slurm") is None  # not in a job: a warning, no deadline
    with pytest.raises(ConfigError, match=r"checkpoint\.deadline"):
        resolve_deadline("tomorrow")


def test_shard_sizes():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1024") == 1024
    with pytest.raises(ValueError):
        parse_size("big")
    sizes = {"a": 40, "b": 70, "c": 30, "huge": 500, "d": 10}
    assert plan_shards(sizes, 100) == [["a"], ["b", "c"], ["huge"], ["d"]]


def test_checkpoint_and_export_keys_are_checked():
    config = load_config(
        overrides=["checkpoint.every_steps=100", "checkpoint.keep_last=3", "export.dtype=bfloat16"]
    )
    assert config.checkpoint.every_steps == 100 and config.export.dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"checkpoint\.on_save_error"):
        load_config(overrides=["checkpoint.on_save_error=ignore"])
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_last"):
        load_config(overrides=["checkpoint.keep_last=-1"])
    with pytest.raises(ConfigError, match=r"export\.max_shard_size"):
        load_config(overrides=["export.max_shard_size=lots"])
