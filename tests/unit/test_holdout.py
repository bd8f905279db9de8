"""data.test_fraction: the test split is disjoint from the training and eval splits and together they are every valid
record, it is the same for the same seed (and another for another seed), leaves the eval split as it was, and is
written to <output_dir>/test_split/<source>.jsonl as the source's own rows; prepared data refuses it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from shared_paths import TOKENIZERS, write_alpaca_and_chats

from ift_dist.config import ConfigError, DataConfig, SourceConfig
from ift_dist.data.holdout import write_test_split
from ift_dist.data.loader import build_loader, scan_sources
from ift_dist.data.plan import PlanSource, held_for_test, heldout_mask, split_off_test
from ift_dist.data.render import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TOKENIZERS / "smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[SourceConfig]:
    """Alpaca rows as JSONL (with one broken line, never part of any split) and FastChat chats as a JSON array."""
    alpaca, chat = write_alpaca_and_chats(
        tmp_path_factory.mktemp("holdout"), alpaca=80, broken_at=5, chats=60
    )
    return [SourceConfig(path=str(alpaca)), SourceConfig(path=str(chat))]


def refs(loader) -> Counter:
    return Counter(ref for batch in loader for row in batch.refs for ref in row)


def data(sources, **options) -> DataConfig:
    return DataConfig(
        **{"sources": sources, "max_length": 512, "pack_buffer": 8, "num_workers": 0, "seed": 3, **options}
    )


def test_test_mask_is_the_top_of_the_hash_whose_bottom_is_the_eval_split():
    indices = np.arange(20_000)
    test = held_for_test("alpaca", indices, 0.1, seed=3)
    evaluation = heldout_mask("alpaca", indices, 0.2, seed=3)
    assert not np.any(test & evaluation)
    assert 0.09 < test.mean() < 0.11
    assert np.array_equal(held_for_test("alpaca", indices, 0.1, seed=3), test)  # deterministic
    assert not np.array_equal(
        held_for_test("alpaca", indices, 0.1, seed=4), test
    )  # another seed, another split
    assert not held_for_test("alpaca", indices, 0.0, seed=3).any()
    rest, held = split_off_test(PlanSource("alpaca", indices, 2.0), 0.1, seed=3)
    assert rest.weight == 2.0 and held.weight == 1.0
    assert np.array_equal(np.sort(np.concatenate([rest.valid_indices, held.valid_indices])), indices)


def test_train_eval_and_test_are_disjoint_and_cover_every_valid_record(sources, tokenizer, tmp_path):
    everything = refs(
        build_loader(data(sources), tokenizer, rank=0, world_size=1, rows_per_batch=4, epochs=1)
    )
    cfg = data(sources, eval_fraction=0.2, test_fraction=0.2)
    train = refs(build_loader(cfg, tokenizer, rank=0, world_size=1, rows_per_batch=4, epochs=1))
    evaluation = refs(build_loader(cfg, tokenizer, rank=0, world_size=1, rows_per_batch=4, split="eval"))
    # The eval split does not move when a test split is added.
    assert evaluation == refs(
        build_loader(
            data(sources, eval_fraction=0.2), tokenizer, rank=0, world_size=1, rows_per_batch=4, split="eval"
        )
    )
    counts = write_test_split(cfg, scan_sources(cfg.sources), tmp_path / "test_split")
    test_rows = {
        name: [
            json.loads(line) for line in (tmp_path / "test_split" / f"{name}.jsonl").read_text().splitlines()
        ]
        for name in ("alpaca", "chat")
    }
    assert counts == {name: len(rows) for name, rows in test_rows.items()} and all(counts.values())
    # The rows are the files' own rows: Alpaca fields, ShareGPT conversations.
    alpaca = [
        json.loads(line) for line in Path(sources[0].path).read_text().splitlines() if "broken" not in line
    ]
    chat = json.loads(Path(sources[1].path).read_text())
    assert all(row in alpaca for row in test_rows["alpaca"]) and all(row in chat for row in test_rows["chat"])
    # Disjoint and complete, by record: the packed refs of train/eval, the written rows of test.
    train_keys = {(ref.source, ref.index) for ref in train}
    eval_keys = {(ref.source, ref.index) for ref in evaluation}
    test_keys = set()
    for item in scan_sources(cfg.sources):
        held = split_off_test(PlanSource(item.scan.name, item.scan.valid_indices), 0.2, seed=3)[1]
        test_keys |= {(item.scan.name, int(index)) for index in held.valid_indices}
    assert not (train_keys & eval_keys) and not (train_keys & test_keys) and not (eval_keys & test_keys)
    assert train_keys | eval_keys | test_keys == {(ref.source, ref.index) for ref in everything}
    assert len(test_keys) == sum(counts.values())
    # Deterministic: written again, the same bytes.
    write_test_split(cfg, scan_sources(cfg.sources), tmp_path / "again")
    for name in counts:
        assert (tmp_path / "again" / f"{name}.jsonl").read_bytes() == (
            tmp_path / "test_split" / f"{name}.jsonl"
        ).read_bytes()


def test_no_test_fraction_writes_nothing_and_changes_nothing(sources, tmp_path):
    assert write_test_split(data(sources), scan_sources(sources), tmp_path / "test_split") == {}
    assert not (tmp_path / "test_split").exists()


def test_config_refuses_a_test_split_it_cannot_hold_out():
    with pytest.raises(ConfigError, match=r"data.test_fraction: not with data.prepared"):
        DataConfig(test_fraction=0.1, prepared="runs/prepared").validate("data")
    with pytest.raises(ConfigError, match=r"data.test_fraction"):
        DataConfig(test_fraction=0.5, eval_fraction=0.5).validate("data")
    with pytest.raises(ConfigError, match=r"data.test_fraction"):
        DataConfig(test_fraction=-0.1).validate("data")
    DataConfig(test_fraction=0.1, eval_fraction=0.1).validate("data")
