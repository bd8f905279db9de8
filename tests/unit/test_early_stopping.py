"""train.early_stopping: the state machine (min, max, auto, min_delta, patience, non-finite values), its state through a
checkpoint round trip, the config checks of the metric, and checkpoint.keep_best: the `best` marker and the retention
that keeps the checkpoint it names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ift_dist.checkpoint import protocol
from ift_dist.checkpoint.run_dir import BEST, LATEST, MARKER
from ift_dist.config import ConfigError, EarlyStoppingConfig, MetricMode, load_config
from ift_dist.early_stopping import EarlyStopping


def watch(**options) -> EarlyStopping:
    return EarlyStopping(EarlyStoppingConfig(**options))


def feed(stopper: EarlyStopping, values: list[float], key: str = "eval_loss") -> list[bool]:
    return [stopper.update(step, {"step": step, key: value}) for step, value in enumerate(values, start=1)]


def test_loss_is_minimised_and_patience_counts_evaluations_without_improvement():
    stopper = watch(patience=2)
    assert stopper.mode == MetricMode.min
    assert feed(stopper, [3.0, 2.0, 2.5]) == [True, True, False]
    assert (stopper.best, stopper.best_step, stopper.bad_evaluations, stopper.should_stop) == (
        2.0,
        2,
        1,
        False,
    )
    assert (
        stopper.update(4, {"eval_loss": 1.9}) and stopper.bad_evaluations == 0
    )  # an improvement resets the count
    assert not stopper.update(5, {"eval_loss": 1.95}) and not stopper.should_stop
    assert not stopper.update(6, {"eval_loss": 2.2}) and stopper.should_stop
    assert "eval_loss has not improved" in stopper.reason() and "at step 4" in stopper.reason()


def test_accuracy_is_maximised_and_min_delta_is_the_margin_to_beat():
    stopper = watch(metric="eval/mmlu/acc", patience=3, min_delta=0.01)
    assert stopper.mode == MetricMode.max
    assert feed(stopper, [0.30, 0.305, 0.32, 0.31, 0.329], key="eval/mmlu/acc") == [
        True,
        False,
        True,
        False,
        False,
    ]
    assert (stopper.best, stopper.best_step, stopper.bad_evaluations) == (0.32, 3, 2)


def test_explicit_mode_overrides_auto_and_auto_needs_a_known_metric():
    assert watch(metric="eval_loss", mode="max").mode == MetricMode.max
    assert watch(metric="eval_perplexity").mode == MetricMode.min
    assert watch(metric="eval/ceval/acc_norm").mode == MetricMode.max
    with pytest.raises(ConfigError, match=r"'auto' cannot tell"):
        EarlyStoppingConfig(metric="eval/mmlu/questions").validate("train.early_stopping")
    EarlyStoppingConfig(metric="eval/mmlu/questions", mode="max").validate("train.early_stopping")


def test_patience_zero_never_stops_but_tracks_the_best():
    stopper = watch()
    assert not stopper.patience and not EarlyStoppingConfig().enabled
    feed(stopper, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert not stopper.should_stop and (stopper.best, stopper.best_step) == (1.0, 1)


def test_non_finite_values_never_improve():
    stopper = watch(patience=2)
    assert feed(stopper, [math.nan, 1.0, math.inf, math.nan]) == [False, True, False, False]
    assert stopper.should_stop and stopper.best == 1.0


def test_a_missing_metric_names_the_ones_there():
    with pytest.raises(KeyError, match=r"eval/mmlu/acc.*eval_loss"):
        watch(metric="eval/mmlu/acc").update(1, {"step": 1, "eval_loss": 1.0})


def test_state_round_trips_through_a_checkpoint_and_continues_counting():
    stopper = watch(patience=3)
    feed(stopper, [2.0, 1.5, 1.7, 1.8])
    state = json.loads(json.dumps(stopper.state_dict()))  # train_state.json holds it
    resumed = watch(patience=3)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == stopper.state_dict()
    assert (
        not resumed.update(5, {"eval_loss": 1.6}) and resumed.should_stop
    )  # 3 evaluations without improvement
    with pytest.raises(ValueError, match=r"watched eval_loss"):
        watch(metric="eval/mmlu/acc").load_state_dict(state)
    fresh = watch(patience=3)
    fresh.load_state_dict(watch(patience=3).state_dict())  # a checkpoint before any evaluation
    assert fresh.best is None and fresh.update(1, {"eval_loss": 9.0})


BASE = ["model.name_or_path=m", "data.eval_fraction=0.1", "train.eval_every=5"]


def test_config_checks_that_evaluations_produce_the_metric():
    load_config(None, [*BASE, "train.early_stopping.patience=2", "checkpoint.keep_best=true"])
    with pytest.raises(ConfigError, match=r"train.early_stopping.patience: needs train.eval_every > 0"):
        load_config(None, [*BASE, "train.eval_every=0", "train.early_stopping.patience=2"])
    with pytest.raises(ConfigError, match=r"checkpoint.keep_best: needs train.eval_every > 0"):
        load_config(None, [*BASE, "train.eval_every=0", "checkpoint.keep_best=true"])
    with pytest.raises(ConfigError, match=r"needs an eval split"):
        load_config(None, ["model.name_or_path=m", "train.eval_every=5", "checkpoint.keep_best=true"])
    with pytest.raises(ConfigError, match=r"names no benchmark of eval.benchmarks"):
        load_config(
            None, [*BASE, "train.early_stopping.patience=2", "train.early_stopping.metric=eval/mmlu/acc"]
        )
    with pytest.raises(ConfigError, match=r"train.early_stopping.metric"):
        load_config(None, [*BASE, "train.early_stopping.metric=accuracy"])
    # Off (patience 0, no keep_best): nothing is required.
    load_config(None, ["model.name_or_path=m", "train.early_stopping.metric=eval/mmlu/acc"])


def complete(checkpoints: Path, step: int) -> Path:
    directory = checkpoints / f"step_{step}"
    directory.mkdir(parents=True)
    (directory / MARKER).write_text(json.dumps({"step": step, "files": {}}))
    (checkpoints / LATEST).write_text(directory.name)
    return directory


def test_retention_keeps_the_best_checkpoint_named_in_best(tmp_path):
    for step in (2, 4, 6, 8):
        complete(tmp_path, step)
    protocol.mark_best(tmp_path / "step_4")
    assert (tmp_path / BEST).read_text() == "step_4" and protocol.best_checkpoint(
        tmp_path
    ) == tmp_path / "step_4"
    deleted = protocol.apply_retention(tmp_path, keep_last=1, keep_every=0, keep_best=True)
    assert sorted(path.name for path in deleted) == ["step_2", "step_6"]
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == ["step_4", "step_8"]
    # Without keep_best the marker is ignored.
    assert protocol.apply_retention(tmp_path, keep_last=1, keep_every=0) == [tmp_path / "step_4"]
    assert protocol.best_checkpoint(tmp_path) is None  # it names a checkpoint that is gone
    with pytest.raises(FileNotFoundError):
        protocol.mark_best(tmp_path / "step_4")
