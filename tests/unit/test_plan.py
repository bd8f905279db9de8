"""The epoch plan: weights, shuffling, the eval split, rank streams (every position once per epoch) and re-dealing a
resume over another world size."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch

from ift_dist.data.plan import (
    EpochPlan,
    PlanSource,
    RankStream,
    RowGroupPlan,
    heldout_mask,
    merge_stream_states,
    split_heldout,
)


def source(name: str, count: int, weight: float = 1.0, *, skip: int = 0) -> PlanSource:
    """`count` valid records; every `skip`-th index is a bad record (not valid)."""
    indices = [index for index in range(2 * count) if not skip or index % skip][:count]
    return PlanSource(name, np.asarray(indices, dtype=np.int64), weight)


def refs_of(plan: EpochPlan, epoch: int) -> Counter:
    source_ids, indices = plan.epoch(epoch)
    return Counter((plan.sources[s].name, int(i)) for s, i in zip(source_ids, indices, strict=True))


def test_weights_are_repeat_factors_per_epoch():
    a, b, c = source("a", 40, 2.0, skip=5), source("b", 30, 0.5), source("c", 11, 1.0)
    plan = EpochPlan([a, b, c], seed=1, shuffle=True)
    assert plan.length == 80 + 15 + 11
    for epoch in range(3):
        counts = refs_of(plan, epoch)
        assert {index for (name, index) in counts if name == "a"} == set(a.valid_indices.tolist())
        assert all(counts[("a", int(index))] == 2 for index in a.valid_indices)
        half = {index for (name, index) in counts if name == "b"}
        assert len(half) == 15 and all(counts[("b", index)] == 1 for index in half)
        assert all(counts[("c", index)] == 1 for index in range(11))
    # The half is re-drawn each epoch; the same seed draws the same halves.
    halves = [{index for (name, index) in refs_of(plan, epoch) if name == "b"} for epoch in range(3)]
    assert halves[0] != halves[1] != halves[2]
    again = EpochPlan([a, b, c], seed=1, shuffle=True)
    assert [refs_of(again, epoch) for epoch in range(3)] == [refs_of(plan, epoch) for epoch in range(3)]


def test_shuffle_is_seeded_per_epoch_and_off_keeps_source_order():
    sources = [source("a", 50), source("b", 50)]
    plan = EpochPlan(sources, seed=7, shuffle=True)
    orders = [plan.epoch(epoch)[1].tolist() for epoch in range(3)]
    assert orders[0] != orders[1] != orders[2]
    assert EpochPlan(sources, seed=7, shuffle=True).epoch(1)[1].tolist() == orders[1]
    assert EpochPlan(sources, seed=8, shuffle=True).epoch(1)[1].tolist() != orders[1]
    fixed = EpochPlan(sources, seed=7, shuffle=False)
    assert fixed.epoch(0)[0].tolist() == [0] * 50 + [1] * 50
    assert fixed.epoch(2)[1].tolist() == list(range(50)) * 2
    assert plan.fingerprint != fixed.fingerprint
    with pytest.raises(ValueError, match="unique"):
        EpochPlan([source("a", 3), source("a", 4)], seed=0, shuffle=False)


def test_eval_split_is_a_stable_seeded_hash_of_name_and_index():
    indices = np.arange(20_000)
    held = heldout_mask("alpaca", indices, 0.1, seed=3)
    assert abs(held.mean() - 0.1) < 0.01
    # The same records whatever else is in the source: a record's fate depends on its own index only.
    assert np.array_equal(heldout_mask("alpaca", indices[5000:6000], 0.1, seed=3), held[5000:6000])
    assert not np.array_equal(heldout_mask("other", indices, 0.1, seed=3), held)
    assert not np.array_equal(heldout_mask("alpaca", indices, 0.1, seed=4), held)
    # A bigger fraction holds out a superset.
    assert np.all(heldout_mask("alpaca", indices, 0.2, seed=3)[held])
    train, evaluation = split_heldout(PlanSource("alpaca", indices, 2.0), 0.1, seed=3)
    assert train.weight == 2.0 and evaluation.weight == 1.0
    assert (
        sorted(np.concatenate([train.valid_indices, evaluation.valid_indices]).tolist()) == indices.tolist()
    )
    assert np.array_equal(evaluation.valid_indices, indices[held])


def read(stream: RankStream, count: int | None = None) -> list[tuple[int, int]]:
    taken = []
    for position in stream.positions():
        if count is not None and len(taken) == count:
            break
        stream.advance(position)
        taken.append(position)
    return taken


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_streams_cover_each_epoch_exactly_once(world_size):
    length = 101
    streams = [RankStream(length, rank, world_size, epochs=3) for rank in range(world_size)]
    taken = Counter(position for stream in streams for position in read(stream))
    assert taken == Counter((epoch, position) for epoch in range(3) for position in range(length))
    assert all(stream.exhausted and stream.epoch == 3 for stream in streams)


def test_endless_stream_runs_into_the_next_epochs():
    stream = RankStream(10, 1, 3)
    positions = read(stream, 9)
    assert positions[:4] == [(0, 1), (0, 4), (0, 7), (1, 1)]
    assert stream.epoch == 3 and not stream.exhausted
    with pytest.raises(ValueError, match="fewer than"):
        RankStream(2, 0, 3)


def test_stream_refuses_positions_out_of_order():
    stream = RankStream(10, 0, 2)
    with pytest.raises(RuntimeError, match="out of order"):
        stream.advance((0, 1))


def test_fair_token_share_across_ranks():
    """Round robin over a shuffled plan: a rank's tokens per epoch are a random sum of L / W lengths, so their
    spread is about cv(length) / sqrt(L / W): here ~2% (std) for 2,500 samples per rank, ~0.3% for 10,000."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.3, 0.9, 20_000), 8, 4096).astype(int)
    plan = EpochPlan([PlanSource("a", np.arange(len(lengths)))], seed=0, shuffle=True)
    for world_size in (2, 3, 8):
        for epoch in range(2):
            order = plan.epoch(epoch)[1]
            tokens = np.array([lengths[order[rank::world_size]].sum() for rank in range(world_size)])
            expected = lengths.std() / lengths.mean() / np.sqrt(len(lengths) / world_size)
            assert tokens.std() / tokens.mean() < 2 * expected, (world_size, epoch, tokens)
            assert (tokens.max() - tokens.min()) / tokens.mean() < 0.08, (world_size, epoch, tokens)


def snapshot(states):
    """Through torch.save / torch.load(weights_only=True), as a checkpoint stores them."""
    buffer = io.BytesIO()
    torch.save(states, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(("new_world_size", "epochs"), [(3, 2), (1, 2), (4, None)])
def test_merge_re_deals_the_unread_positions(new_world_size, epochs):
    length = 50
    streams = [RankStream(length, rank, 2, epochs=epochs) for rank in range(2)]
    taken = Counter()
    # Rank 0 reads into epoch 1, rank 1 stays in epoch 0; each holds some read positions in its "packer".
    held = []
    for stream, count in zip(streams, (31, 7), strict=True):
        positions = read(stream, count)
        taken.update(positions[:-3])
        held.append(np.asarray(positions[-3:]))
    assert streams[0].epoch == 1 and streams[1].epoch == 0
    merged = snapshot(merge_stream_states(snapshot([s.state_dict() for s in streams]), held, new_world_size))
    new_streams = []
    for rank, state in enumerate(merged):
        stream = RankStream(length, rank, new_world_size, epochs=epochs)
        stream.load_state_dict(state)
        new_streams.append(stream)
    # Read 2 epochs' worth more in total: epochs 0 and 1 must then be complete, each position exactly once.
    for stream in new_streams:
        taken.update(
            position for position in read(stream, 2 * length // new_world_size + 5) if position[0] < 2
        )
    assert taken == Counter((epoch, position) for epoch in range(2) for position in range(length))
    # The leftovers were dealt evenly.
    pending = [len(state["pending"]) for state in merged]
    assert max(pending) - min(pending) <= 1


def test_merge_twice_and_back():
    length = 40
    streams = [RankStream(length, rank, 3, epochs=1) for rank in range(3)]
    taken = Counter()
    for stream, count in zip(streams, (5, 9, 13), strict=True):
        taken.update(read(stream, count))
    states = merge_stream_states([s.state_dict() for s in streams], [np.zeros((0, 2))] * 3, 2)
    streams = [RankStream(length, rank, 2, epochs=1) for rank in range(2)]
    for stream, state, count in zip(streams, states, (2, 4), strict=True):
        stream.load_state_dict(state)
        taken.update(read(stream, count))
    states = merge_stream_states([s.state_dict() for s in streams], [np.zeros((0, 2))] * 2, 3)
    for rank, state in enumerate(states):
        stream = RankStream(length, rank, 3, epochs=1)
        stream.load_state_dict(state)
        taken.update(read(stream))
    assert taken == Counter((0, position) for position in range(length))


def test_merge_refuses_inconsistent_states():
    streams = [RankStream(20, rank, 2) for rank in range(2)]
    states = [stream.state_dict() for stream in streams]
    with pytest.raises(ValueError, match="expected 1 of 2"):
        merge_stream_states([states[0], states[0]], [np.zeros((0, 2))] * 2, 3)
    twice = [np.array([[0, 0]]), np.array([[0, 0]])]
    with pytest.raises(ValueError, match="twice"):
        merge_stream_states(states, twice, 3)
    with pytest.raises(ValueError, match="merge_states"):
        RankStream(20, 0, 3).load_state_dict(states[0])


def test_row_group_plan_keeps_groups_together():
    plan = RowGroupPlan([3, 5, 2], seed=0, shuffle=True)
    assert plan.length == 10
    for epoch in range(3):
        groups, rows = plan.epoch(epoch)
        assert Counter(zip(groups.tolist(), rows.tolist(), strict=True)) == Counter(
            (group, row) for group, size in enumerate([3, 5, 2]) for row in range(size)
        )
        changes = int(np.sum(groups[1:] != groups[:-1]))
        assert changes == 2  # each group read in one go
    assert [plan.epoch(e)[0].tolist() for e in range(4)] != [plan.epoch(0)[0].tolist()] * 4
    assert RowGroupPlan([3, 5, 2], seed=0, shuffle=False).epoch(1)[0].tolist() == [0] * 3 + [1] * 5 + [2] * 2


@pytest.mark.parametrize("seed", range(12))
def test_random_resumes_keep_every_epoch_exact(seed):
    """Random world sizes, random progress per rank, random samples still held in packers, three resumes."""
    rng = np.random.default_rng(seed)
    length, world_size = int(rng.integers(8, 60)), int(rng.integers(1, 5))
    streams = [RankStream(length, rank, world_size) for rank in range(world_size)]
    used = Counter()
    for _ in range(3):
        held = []
        for stream in streams:
            positions = read(stream, int(rng.integers(0, 2 * length // len(streams) + 2)))
            keep = rng.random(len(positions)) < 0.3  # read, still in the packer
            used.update(position for position, kept in zip(positions, keep, strict=True) if not kept)
            held.append(
                np.asarray([p for p, kept in zip(positions, keep, strict=True) if kept]).reshape(-1, 2)
            )
        new_world_size = int(rng.integers(1, 5))
        states = merge_stream_states([stream.state_dict() for stream in streams], held, new_world_size)
        streams = []
        for rank, state in enumerate(states):
            streams.append(RankStream(length, rank, new_world_size))
            streams[-1].load_state_dict(state)
    last = max(epoch for epoch, _ in used) + 1
    for stream in streams:
        while stream.epoch <= last:
            used.update(read(stream, 1))
    assert {key: count for key, count in used.items() if key[0] <= last} == {
        (epoch, position): 1 for epoch in range(last + 1) for position in range(length)
    }
