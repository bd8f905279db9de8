"""The resumable loader on real records and the real SmolLM2 tokenizer: the batch contract, exact state round trips
(0 and 2 workers), every sample once per epoch across ranks and workers, resumes on 3 and 1 ranks from 2, the eval
split, bad records, prepared shards, and (slow) packing efficiency on all the English training data."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from shared_paths import write_alpaca_and_chats

from ift_dist.config import DataConfig, SourceConfig
from ift_dist.data.contracts import IGNORE_INDEX, BadRecordError
from ift_dist.data.loader import build_loader, merge_states, scan_sources
from ift_dist.data.render import load_tokenizer

SHARED = Path(__file__).resolve().parents[3] / "shared"
DATA = SHARED / "data"
SMOLLM2 = SHARED / "tokenizers" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(SMOLLM2))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[SourceConfig]:
    """Small slices of real files: Alpaca as JSONL with one broken line, FastChat multi-turn, KTO (label true)."""
    directory = tmp_path_factory.mktemp("corpus")
    write_alpaca_and_chats(directory, alpaca=70, broken_at=10, chats=60)
    kto = json.loads((DATA / "llamafactory/kto_en_demo.json").read_text())[:30]
    (directory / "kto.json").write_text(json.dumps(kto))
    return [
        SourceConfig(path=str(directory / "alpaca.jsonl")),
        SourceConfig(path=str(directory / "chat.json"), weight=2.0),
        SourceConfig(path=str(directory / "kto.json"), weight=0.5, where={"label": True}),
    ]


def config(corpus, **overrides) -> DataConfig:
    options = {"sources": corpus, "max_length": 512, "pack_buffer": 16, "num_workers": 0, "seed": 3}
    return DataConfig(**{**options, **overrides})


def build(cfg, tokenizer, *, rank=0, world_size=1, rows=2, **options):
    return build_loader(cfg, tokenizer, rank=rank, world_size=world_size, rows_per_batch=rows, **options)


def take(loader, count):
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def as_lists(batch):
    return (
        batch.input_ids.tolist(),
        batch.labels.tolist(),
        batch.position_ids.tolist(),
        batch.seq_lens,
        batch.refs,
    )


def refs_of(batches) -> Counter:
    return Counter(ref for batch in batches for row in batch.refs for ref in row)


def checkpoint(obj):
    """Through torch.save / torch.load(weights_only=True), as a checkpoint stores it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_batches_follow_the_packed_batch_contract(corpus, tokenizer):
    cfg = config(corpus)
    for batch in take(build(cfg, tokenizer, rows=3), 4):
        rows, width = batch.input_ids.shape
        assert rows == 3 and width == max(sum(lens) for lens in batch.seq_lens) <= 512
        for row, lens in enumerate(batch.seq_lens):
            end = sum(lens)
            assert batch.input_ids[row, end:].eq(tokenizer.pad_token_id).all()
            assert batch.labels[row, end:].eq(IGNORE_INDEX).all()
            assert batch.position_ids[row, end:].eq(0).all()
            start = 0
            for length in lens:
                assert batch.position_ids[row, start : start + length].tolist() == list(range(length))
                assert batch.labels[row, start] == IGNORE_INDEX
                start += length
        assert batch.num_tokens == sum(map(sum, batch.seq_lens))
    fixed = take(build(config(corpus, pad_to_max_length=True), tokenizer), 1)[0]
    assert fixed.input_ids.shape[1] == 512
    padded = take(build(config(corpus, packing=False), tokenizer, rows=4), 3)
    assert all(len(lens) == 1 for batch in padded for lens in batch.seq_lens)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_round_trip_gives_the_same_next_batches(corpus, tokenizer, num_workers):
    reference = [as_lists(batch) for batch in take(build(config(corpus), tokenizer), 40)]
    loader = build(config(corpus, num_workers=num_workers), tokenizer)
    first = take(loader, 25)
    assert [as_lists(batch) for batch in first] == reference[:25]  # the same batches with workers
    state = checkpoint(loader.state_dict())
    report = loader.report()
    # Mid-epoch, with samples in the packer buffer: the hard case.
    assert len(state["packer"]["lengths"]) > 0 and report["epoch"] >= 1
    restored = build(config(corpus, num_workers=num_workers), tokenizer)
    restored.load_state_dict(state)
    assert restored.report() == report
    assert [as_lists(batch) for batch in take(restored, 15)] == reference[25:40]
    with pytest.raises(ValueError, match="another data plan"):
        build(config(corpus, seed=4), tokenizer).load_state_dict(state)
    with pytest.raises(ValueError, match="buffer_size"):
        build(config(corpus, pack_buffer=17), tokenizer).load_state_dict(state)


def test_every_sample_once_per_epoch_across_ranks_and_workers(corpus, tokenizer):
    single = build(config(corpus), tokenizer, epochs=1)
    expected = refs_of(single)
    report = single.report()
    # Weights: chat twice, KTO a half of its label-true records; the broken Alpaca line is not read.
    kto = report["scan"]["kto"]
    assert kto["records"] == 30 and kto["filtered"] == 30 - kto["valid"]
    assert max(count for ref, count in expected.items() if ref.source == "chat") == 2
    assert len({ref for ref in expected if ref.source == "kto"}) <= round(kto["valid"] / 2)
    assert report["samples"] == sum(expected.values())
    assert report["samples"] + sum(report["dropped"].values()) == 70 + 2 * 60 + round(kto["valid"] / 2)
    assert report["scan"]["alpaca"]["bad"] == {"invalid_json": 1}
    for world_size in (2, 3):
        loaders = [
            build(
                config(corpus, num_workers=2 if rank == 0 else 0),
                tokenizer,
                rank=rank,
                world_size=world_size,
                epochs=1,
            )
            for rank in range(world_size)
        ]
        per_rank = [refs_of(loader) for loader in loaders]
        assert sum(per_rank, Counter()) == expected
        tokens = [loader.report()["tokens"] for loader in loaders]
        assert max(tokens) / min(tokens) < 1.5, tokens  # a few hundred samples: fair only roughly


@pytest.mark.parametrize("new_world_size", [3, 1])
def test_resume_on_another_world_size_repeats_and_skips_nothing(corpus, tokenizer, new_world_size):
    expected = refs_of(build(config(corpus), tokenizer, epochs=1))
    loaders = [build(config(corpus), tokenizer, rank=rank, world_size=2, epochs=1) for rank in range(2)]
    seen = refs_of(take(loaders[0], 7)) + refs_of(take(loaders[1], 12))
    states = merge_states(checkpoint([loader.state_dict() for loader in loaders]), new_world_size)
    assert len(states) == new_world_size
    resumed = []
    for rank, state in enumerate(checkpoint(states)):
        loader = build(config(corpus), tokenizer, rank=rank, world_size=new_world_size, epochs=1)
        loader.load_state_dict(state)
        seen += refs_of(loader)
        resumed.append(loader)
    assert seen == expected
    assert sum(loader.report()["samples"] for loader in resumed) == sum(expected.values())
    with pytest.raises(ValueError, match="merge_states"):
        build(config(corpus), tokenizer, rank=0, world_size=4).load_state_dict(states[0])


def test_endless_stream_counts_epochs(corpus, tokenizer):
    loader = build(config(corpus[1:2], pack_buffer=4), tokenizer, rank=1, world_size=2, rows=4)
    epochs = []
    for _ in loader:
        epochs.append(loader.report()["epoch"])
        if len(epochs) == 40:
            break
    # 60 records read twice per epoch, half of them by this rank: 60 samples per epoch, ~10 rows of 4.
    assert epochs[0] == 0 and epochs[-1] >= 2 and epochs == sorted(epochs)


def test_eval_split_is_disjoint_complete_and_independent_of_world_size(corpus, tokenizer):
    cfg = config(corpus[:2], eval_fraction=0.25)
    everything = refs_of(build(config(corpus[:2]), tokenizer, epochs=1))
    train = refs_of(build(cfg, tokenizer, epochs=1))
    evaluation = build(cfg, tokenizer, split="eval")
    held = refs_of(evaluation)
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(everything)
    assert all(count == 1 for count in held.values())  # eval reads each held-out record once
    assert 0.1 < len(held) / len(everything) < 0.4
    assert refs_of(evaluation) == held  # a second pass starts over
    take(evaluation, 2)
    assert refs_of(evaluation) == held  # so does one after a pass broken off
    on_three = [build(cfg, tokenizer, rank=rank, world_size=3, split="eval") for rank in range(3)]
    assert sum((refs_of(loader) for loader in on_three), Counter()) == held
    named = refs_of(build(config(corpus[:1], eval_sources=corpus[2:]), tokenizer, split="eval"))
    assert {ref.source for ref in named} == {"kto"}


def test_bad_record_error_stops_at_build_time(corpus, tokenizer):
    with pytest.raises(BadRecordError, match="line 11"):
        build(config(corpus, on_bad_record="error"), tokenizer)
    with pytest.raises(BadRecordError):
        scan_sources(corpus, on_bad_record="error")


def row_dicts(batches):
    """Each row of each batch without its padding, as the prepared columns hold it."""
    for batch in batches:
        for ids, labels, positions, lens, refs in zip(*as_lists(batch), strict=True):
            end = sum(lens)
            yield {
                "input_ids": ids[:end],
                "labels": labels[:end],
                "position_ids": positions[:end],
                "seq_lens": lens,
                "sources": [str(ref) for ref in refs],
            }


def row_texts(batches) -> Counter:
    return Counter(json.dumps(row, sort_keys=True) for row in row_dicts(batches))


def write_prepared(directory: Path, loader) -> list:
    """What `ift data prepare` writes: manifest.json + shard-*.parquet of packed rows (small row groups here)."""
    directory.mkdir()
    rows = list(row_dicts(loader))
    schema = pa.schema(
        [(name, pa.list_(pa.int32())) for name in ("input_ids", "labels", "position_ids", "seq_lens")]
    )
    schema = schema.append(pa.field("sources", pa.list_(pa.string())))
    half = len(rows) // 2
    for number, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(
            pa.Table.from_pylist(part, schema=schema),
            directory / f"shard-{number:05d}.parquet",
            row_group_size=4,
        )
    (directory / "manifest.json").write_text(json.dumps({"rows": len(rows)}))
    return rows


def test_prepared_shards_stream_resumably(corpus, tokenizer, tmp_path):
    rows = write_prepared(tmp_path / "prepared", build(config(corpus), tokenizer, epochs=1))
    expected = Counter(json.dumps(row, sort_keys=True) for row in rows)
    cfg = config(corpus, prepared=str(tmp_path / "prepared"))
    loaders = [build(cfg, tokenizer, rank=rank, world_size=2, epochs=1) for rank in range(2)]
    seen = row_texts(take(loaders[0], 3)) + row_texts(take(loaders[1], 5))
    states = merge_states(checkpoint([loader.state_dict() for loader in loaders]), 3)
    for rank, state in enumerate(states):
        loader = build(cfg, tokenizer, rank=rank, world_size=3, epochs=1)
        loader.load_state_dict(state)
        seen += row_texts(loader)
    assert seen == expected
    # Same world size: the next batches are exactly the uninterrupted ones.
    reference = [as_lists(batch) for batch in take(build(cfg, tokenizer), 30)]
    loader = build(cfg, tokenizer)
    take(loader, 11)
    restored = build(cfg, tokenizer)
    restored.load_state_dict(checkpoint(loader.state_dict()))
    assert [as_lists(batch) for batch in take(restored, 19)] == reference[11:]


ENGLISH = [
    SourceConfig(path=str(DATA / "llamafactory/alpaca_en_demo.json")),
    SourceConfig(
        path=str(DATA / "llamafactory/identity.json"), placeholders={"name": "Ada", "author": "Lab"}
    ),
    SourceConfig(path=str(DATA / "llamafactory/glaive_toolcall_en_demo.json")),
    SourceConfig(path=str(DATA / "llamafactory/kto_en_demo.json"), where={"label": True}),
    SourceConfig(path=str(DATA / "fastchat/dummy_conversation.json")),
    SourceConfig(path=str(DATA / "stanford_alpaca/seed_tasks.jsonl")),
]


@pytest.mark.slow
def test_packing_efficiency_on_all_english_training_data(tokenizer):
    """Training streams without end, so the rows it sees are the steady state: >= 99.5% with the default buffer
    (2,000 samples) and with a quarter of it. A single pass that must flush also pays for its last, part-filled row."""
    scanned = scan_sources(ENGLISH)
    for pack_buffer in (2000, 500):
        cfg = DataConfig(sources=ENGLISH, max_length=4096, pack_buffer=pack_buffer, num_workers=1)
        loader = build(cfg, tokenizer, rows=1, scanned=scanned)
        for _ in loader:
            if loader.report()["epoch"] >= 2:
                break
        report = loader.report()
        print(
            f"pack_buffer {pack_buffer}: {report['rows']} rows, efficiency {report['packing_efficiency']:.5f}"
        )
        assert report["packing_efficiency"] >= 0.995
    single = build(
        DataConfig(sources=ENGLISH, max_length=4096, num_workers=1),
        tokenizer,
        rows=1,
        epochs=1,
        scanned=scanned,
    )
    fills = [sum(batch.seq_lens[0]) for batch in single]
    report = single.report()
    print(
        f"one pass with flush: {report['rows']} rows, efficiency {report['packing_efficiency']:.5f}, last fills {sorted(fills)[:3]}"
    )
    # Every row but the part-filled last ones is as full as the samples allow.
    assert sum(fills) / ((len(fills) - 1) * 4096) >= 0.995


def test_record_broken_after_the_scan_is_counted_or_raised(corpus, tokenizer, tmp_path):
    lines = [
        json.dumps(record) for record in json.loads((DATA / "llamafactory/identity.json").read_text())[:20]
    ]
    path = tmp_path / "identity.jsonl"
    path.write_text("\n".join(lines) + "\n")
    sources = [SourceConfig(path=str(path), placeholders={"name": "Ada", "author": "Lab"})]
    loaders = {
        policy: build(config(sources, on_bad_record=policy), tokenizer, epochs=1)
        for policy in ("skip", "error")
    }
    # The file changes after the build-time scan: line 5 becomes invalid JSON of the same length.
    lines[4] = "{" + " " * (len(lines[4]) - 1)
    path.write_text("\n".join(lines) + "\n")
    skipped = refs_of(loaders["skip"])
    assert len(skipped) == 19 and loaders["skip"].report()["bad_records"] == {"invalid_json": 1}
    with pytest.raises(BadRecordError, match="line 5"):
        refs_of(loaders["error"])
