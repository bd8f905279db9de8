"""train.num_epochs: the config accepts it instead of train.max_steps (both set is an error, neither is 1000 steps),
the step count is HF Trainer's ceil arithmetic over the packed rows of one epoch, counted through the real loader on
every world size, taken from the checkpoint on resume, and the LR schedule decays over it."""

from __future__ import annotations

import copy
import math

import pytest
from shared_paths import DATA, TOKENIZERS

from ift_dist.checkpoint.compat import config_changes
from ift_dist.config import (
    BatchPlan,
    ConfigError,
    DataConfig,
    SourceConfig,
    TrainConfig,
    load_config,
    to_dict,
)
from ift_dist.config.schema import DEFAULT_MAX_STEPS
from ift_dist.data.epochs import StepCount, count_epoch_rows, step_count, steps_for_epochs
from ift_dist.data.loader import build_loader
from ift_dist.data.render import load_tokenizer
from ift_dist.optim import learning_rate


def plan(global_batch_rows: int = 8) -> BatchPlan:
    return BatchPlan(world_size=2, micro_batch_rows=2, accumulation_steps=global_batch_rows // 4,
                     global_batch_rows=global_batch_rows, max_length=512)  # fmt: skip


@pytest.mark.parametrize(
    ("num_epochs", "rows", "batch", "per_epoch", "total"),
    [
        (1, 80, 8, 10, 10),  # whole steps
        (1, 81, 8, 11, 11),  # a partial last step counts as a step (HF: ceil), it is not dropped
        (3, 81, 8, 11, 33),
        (2, 3, 8, 1, 2),  # fewer rows than one global batch: still one step per epoch
        (1.5, 80, 8, 10, 15),
        (0.25, 81, 8, 11, 3),  # ceil(2.75)
        (1.1, 10, 1, 10, 11),  # 1.1 x 10 is 11.000000000000002 in floats: not 12
    ],
)
def test_steps_are_hf_trainers_ceil_arithmetic(num_epochs, rows, batch, per_epoch, total):
    count = steps_for_epochs(num_epochs, rows, batch)
    assert (count.steps_per_epoch, count.total) == (per_epoch, total)
    # HF Trainer: len(dataloader) = ceil(rows / (micro x ranks)), steps = ceil(len / accumulation), then
    # max_steps = ceil(num_epochs x steps): the same as one ceil over the global batch.
    micro_times_ranks, accumulation = (batch, 1) if batch < 4 else (4, batch // 4)
    hf_per_epoch = max(1, math.ceil(math.ceil(rows / micro_times_ranks) / accumulation))
    assert hf_per_epoch == per_epoch


def test_the_description_shows_the_arithmetic():
    text = steps_for_epochs(3, 81, 8).describe()
    assert "33 optimizer steps" in text and "ceil(3 epochs x 11 steps per epoch)" in text
    assert "ceil(81 packed rows per epoch / 8 rows per step)" in text


def test_config_takes_max_steps_or_num_epochs_not_both():
    assert TrainConfig().step_limit == DEFAULT_MAX_STEPS == 1000  # neither set: today's default
    assert TrainConfig(max_steps=7).step_limit == 7
    assert TrainConfig(num_epochs=2).step_limit is None  # the data decides
    with pytest.raises(ConfigError, match=r"train.max_steps and train.num_epochs are both set"):
        load_config(None, ["model.name_or_path=m", "train.max_steps=10", "train.num_epochs=2"])
    with pytest.raises(ConfigError, match=r"train.num_epochs"):
        load_config(None, ["model.name_or_path=m", "train.num_epochs=-1"])
    assert load_config(None, ["model.name_or_path=m", "train.num_epochs=1.5"]).train.num_epochs == 1.5


def test_step_count_sources():
    calls = []

    def count_rows():
        calls.append(1)
        return 81

    assert (
        step_count(TrainConfig(max_steps=5), plan(), saved=None, count_rows=count_rows).origin
        == "train.max_steps"
    )
    default = step_count(TrainConfig(), plan(), saved=None, count_rows=count_rows)
    assert (default.total, default.origin) == (1000, "default") and not calls
    counted = step_count(TrainConfig(num_epochs=3), plan(), saved=None, count_rows=count_rows)
    assert (counted.total, counted.origin, len(calls)) == (33, "train.num_epochs", 1)
    # A resume takes the count its checkpoint recorded (train_state.json "steps"): no recount, the same schedule.
    saved = {"steps": counted.state_dict()}
    resumed = step_count(TrainConfig(num_epochs=3), plan(), saved=saved, count_rows=count_rows)
    assert (resumed.total, resumed.origin, len(calls)) == (33, "checkpoint", 1)
    assert resumed == StepCount(**{**counted.state_dict(), "origin": "checkpoint"})
    # Another num_epochs (a forced resume) counts again.
    assert step_count(TrainConfig(num_epochs=2), plan(), saved=saved, count_rows=count_rows).total == 22


def test_lr_schedule_decays_over_the_derived_step_count():
    train = TrainConfig(
        num_epochs=1, learning_rate=1.0, warmup_steps=0, min_lr_ratio=0.0, lr_schedule="linear"
    )
    assert learning_rate(5, train, 10) == pytest.approx(0.5)
    assert learning_rate(10, train, 10) == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"train.num_epochs"):
        learning_rate(5, train)  # no fixed step count to decay over
    assert learning_rate(500, TrainConfig(learning_rate=1.0, lr_schedule="linear")) == pytest.approx(0.5)


def test_rows_per_epoch_are_counted_through_the_real_loader():
    tokenizer = load_tokenizer(str(TOKENIZERS / "smollm2-135m-instruct"))
    data = DataConfig(
        sources=[SourceConfig(path=str(DATA / "llamafactory/identity.json"), placeholders={"name": "N", "author": "A"})],
        max_length=256, pack_buffer=16, num_workers=0,
    )  # fmt: skip
    one_rank = BatchPlan(1, 2, 1, 2, 256)
    rows = count_epoch_rows(data, tokenizer, one_rank, scanned=None, renderer=None)
    loader = build_loader(data, tokenizer, rank=0, world_size=1, rows_per_batch=2, epochs=1)
    assert rows == sum(batch.input_ids.shape[0] for batch in loader) > 1
    assert loader.report()["samples"] == loader.plan.length  # every sample of the epoch is in those rows


def test_a_checkpoint_of_an_older_config_resumes_and_a_changed_step_count_is_refused():
    new = to_dict(load_config(None, ["model.name_or_path=m"]))
    old = copy.deepcopy(new)
    old["train"]["max_steps"] = 1000  # written out by versions whose default it was
    del (
        old["train"]["num_epochs"],
        old["train"]["early_stopping"],
        old["checkpoint"]["keep_best"],
    )  # added since
    assert config_changes(old, new) == ([], [])
    by_epochs = to_dict(load_config(None, ["model.name_or_path=m", "train.num_epochs=2"]))
    refused, _ = config_changes(old, by_epochs)
    assert refused == ["train.max_steps", "train.num_epochs"]
