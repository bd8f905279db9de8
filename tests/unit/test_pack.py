"""Packing: best-fit decreasing, the packed-row invariants, streaming determinism, efficiency and state round trips."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch

from ift_dist.data.contracts import IGNORE_INDEX, RenderedSample, SampleRef
from ift_dist.data.pack import StreamingPacker, best_fit_decreasing, make_row


def synthetic_samples(count: int, *, seed: int = 0, low: int = 1, high: int = 300) -> list[RenderedSample]:
    """Random token ids and labels (prompt part IGNORE_INDEX, reply part = the ids), unique refs."""
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        length = rng.randint(low, high)
        ids = [rng.randrange(5, 50_000) for _ in range(length)]
        prompt = rng.randint(0, length - 1)
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        samples.append(
            RenderedSample(ids, labels, SampleRef(f"s{index % 3}", index), dropped_turns=index % 2)
        )
    return samples


def stream(packer: StreamingPacker, samples, *, flush: bool = True):
    rows = []
    for number, sample in enumerate(samples):
        packer.add(sample, (0, number))
        while packer.ready:
            rows.append(packer.pop())
    if flush:
        packer.flush()
        while packer.ready:
            rows.append(packer.pop())
    return rows


def check_rows(rows, samples, max_length: int) -> None:
    """Every sample in exactly one row, its tokens contiguous and equal; positions restart; first label ignored."""
    by_ref = {sample.ref: sample for sample in samples}
    seen = []
    for row in rows:
        assert len(row) <= max_length
        assert sum(row.seq_lens) == len(row) == len(row.labels) == len(row.position_ids)
        assert len(row.refs) == len(row.seq_lens)
        start = 0
        for length, ref in zip(row.seq_lens, row.refs, strict=True):
            sample = by_ref[ref]
            assert row.input_ids[start : start + length] == sample.input_ids
            assert row.position_ids[start : start + length] == list(range(length))
            assert row.labels[start] == IGNORE_INDEX
            assert row.labels[start + 1 : start + length] == sample.labels[1:]
            seen.append(ref)
            start += length
    assert sorted(seen) == sorted(by_ref), "a sample was lost or duplicated"


def test_best_fit_decreasing_places_every_item_once_and_tightly():
    lengths = [7, 5, 5, 4, 3, 3, 2, 2, 1]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(item for members in bins for item in members) == list(range(len(lengths)))
    assert all(sum(lengths[item] for item in members) <= 10 for members in bins)
    assert len(bins) == math.ceil(sum(lengths) / 10)  # 32 tokens -> 4 rows, the lower bound
    # Longest first; the 3 goes to the 7 (tightest fit), not to a 5.
    assert bins[0] == [0, 4]
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing([11], 10)


def test_make_row_masks_every_sample_boundary():
    first = RenderedSample([1, 2, 3], [1, 2, 3], SampleRef("a", 0))
    second = RenderedSample([4, 5], [IGNORE_INDEX, 5], SampleRef("a", 1))
    row = make_row([first, second])
    assert row.input_ids == [1, 2, 3, 4, 5]
    assert row.labels == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]
    assert row.position_ids == [0, 1, 2, 0, 1]
    assert row.seq_lens == [3, 2]
    assert row.refs == [SampleRef("a", 0), SampleRef("a", 1)]


@pytest.mark.parametrize("buffer_size", [1, 7, 64])
def test_streaming_packer_invariants(buffer_size):
    samples = synthetic_samples(300, seed=buffer_size)
    rows = stream(StreamingPacker(512, buffer_size), samples)
    check_rows(rows, samples, 512)


def test_streaming_packer_is_deterministic():
    samples = synthetic_samples(400, seed=3)
    first = stream(StreamingPacker(600, 50), samples)
    second = stream(StreamingPacker(600, 50), [RenderedSample(**vars(sample)) for sample in samples])
    assert first == second


def test_padded_mode_gives_one_sample_per_row_in_order():
    samples = synthetic_samples(20, seed=4)
    rows = stream(StreamingPacker(512, 10, packing=False), samples)
    assert [row.refs for row in rows] == [[sample.ref] for sample in samples]
    check_rows(rows, samples, 512)


def test_overlong_sample_is_refused():
    with pytest.raises(ValueError, match="max_length"):
        StreamingPacker(8, 4).add(RenderedSample(list(range(9)), list(range(9)), SampleRef("a", 0)))


def test_efficiency_on_synthetic_lengths():
    """Lengths like chat data (log-normal, median ~200 tokens) into 4096-token rows."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.3, 0.9, 8000), 8, 4096).astype(int)
    samples = [RenderedSample([1] * n, [1] * n, SampleRef("a", i)) for i, n in enumerate(lengths)]
    packer = StreamingPacker(4096, 500)
    rows = stream(packer, samples)
    lower_bound = math.ceil(lengths.sum() / 4096)
    assert packer.stats["rows"] == len(rows)
    assert packer.stats["tokens"] == lengths.sum()
    assert packer.efficiency == pytest.approx(lengths.sum() / (len(rows) * 4096))
    # At most one row more than a perfect packing; what remains is the last row's emptiness.
    assert len(rows) <= lower_bound + 1, (len(rows), lower_bound)
    assert packer.efficiency >= 0.998, packer.efficiency


@pytest.mark.parametrize("packing", [True, False])
def test_state_round_trip_continues_exactly(packing):
    samples = synthetic_samples(250, seed=5)
    reference = stream(StreamingPacker(700, 40, packing=packing), samples)

    packer = StreamingPacker(700, 40, packing=packing)
    rows = []
    for number, sample in enumerate(samples[:137]):
        packer.add(sample, (0, number))
        # Take only some rows, so that built rows are waiting too when the state is saved.
        if packer.ready > 2:
            rows.append(packer.pop())
    assert packer.buffered + packer.ready > 0
    buffer = io.BytesIO()
    torch.save(packer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # what a checkpoint holds: tensors and plain Python only
    assert sorted(map(tuple, state["positions"].tolist())) == sorted(packer.held_positions())

    restored = StreamingPacker(700, 40, packing=packing)
    restored.load_state_dict(state)
    assert restored.stats == packer.stats
    rest = stream(restored, samples[137:])
    assert [(row.refs, row.input_ids, row.labels) for row in rows + rest] == [
        (row.refs, row.input_ids, row.labels) for row in reference
    ]
    with pytest.raises(ValueError, match="buffer_size"):
        StreamingPacker(700, 41, packing=packing).load_state_dict(state)


def test_stats_count_what_leaves_in_rows():
    samples = synthetic_samples(50, seed=6)
    packer = StreamingPacker(400, 10)
    rows = stream(packer, samples)
    assert packer.stats["samples"] == 50
    assert packer.stats["rows"] == len(rows)
    assert packer.stats["dropped_turns"] == sum(sample.dropped_turns for sample in samples)


def test_add_packed_keeps_a_prepared_row_as_is():
    packer = StreamingPacker(10, 4)
    parts = [RenderedSample([1, 2, 3], [IGNORE_INDEX, 2, 3], SampleRef("a", 0))]
    parts.append(RenderedSample([4, 5], [IGNORE_INDEX, 5], SampleRef("b", 1)))
    packer.add_packed(parts, (0, 7))
    assert packer.ready == 1 and packer.held_positions() == [(0, 7), (0, 7)]
    row = packer.pop()
    assert row.input_ids == [1, 2, 3, 4, 5] and row.seq_lens == [3, 2]
    with pytest.raises(ValueError, match="exceeds"):
        packer.add_packed(parts * 3)
