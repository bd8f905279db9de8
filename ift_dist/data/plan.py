"""Decides which records each rank reads and in which order, epoch after epoch, resumably across world sizes.

Epoch plan. Each source contributes round(weight x valid records) records per epoch: floor(weight) full passes over
its valid records plus a seeded random subset (without replacement, re-drawn every epoch) for the fractional part,
so 2.0 = every record twice and 0.5 = a random half. The concatenation is shuffled by (seed, epoch). The plan of an
epoch is a pair of integer arrays computed on demand: O(records) integers, never the corpus.

Eval and test splits. A hash of (seed, source name, record index) maps each record to u in [0, 1). With
eval_fraction > 0 a record is held out for evaluation iff u < eval_fraction; with test_fraction > 0 it is held out
from both training and evaluation iff u >= 1 - test_fraction: the same records in every run and at every world size,
the two splits disjoint, and the eval split the same with or without a test split.

Rank streams. Plan positions are (epoch, position). Rank r of a world of W reads positions r, r + W, r + 2W, ... of
each epoch, continuing into the next epoch without end (ranks never wait for each other at an epoch end) or until a
fixed number of epochs. A stream first reads its explicit `pending` positions: what a resume on a different world
size dealt it (see `merge_stream_states`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each uint64 (the splitmix64 finaliser), vectorised."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _unit_hash(name: str, indices: np.ndarray, seed: int) -> np.ndarray:
    """hash(seed, name, index) of each record as a float64 in [0, 1)."""
    digest = hashlib.blake2b(f"{seed & _MASK64}:{name}".encode(), digest_size=8).digest()
    salt = np.uint64(int.from_bytes(digest, "little"))
    hashed = _splitmix64(_splitmix64(np.asarray(indices, dtype=np.uint64) ^ salt))
    # The top 53 bits as a float in [0, 1): exact, so the comparison is the same on every machine.
    return (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def heldout_mask(name: str, indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the records (by index) that the eval split holds out: hash(seed, name, index) / 2**64 < fraction."""
    return _unit_hash(name, indices, seed) < fraction


def held_for_test(name: str, indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the records (by index) of the test split: the top `fraction` of the same hash, so never a record
    of the eval split while eval_fraction + fraction < 1."""
    if fraction <= 0:
        return np.zeros(len(indices), dtype=bool)
    return _unit_hash(name, indices, seed) >= 1.0 - fraction


@dataclass(frozen=True)
class PlanSource:
    """One source as the plan sees it: its name, the indices of its valid records and its weight."""

    name: str
    valid_indices: np.ndarray  # int64, ascending
    weight: float = 1.0

    @property
    def count(self) -> int:
        """Records it contributes to every epoch: weight x valid records, rounded half up."""
        return math.floor(self.weight * len(self.valid_indices) + 0.5)


def split_heldout(source: PlanSource, fraction: float, seed: int) -> tuple[PlanSource, PlanSource]:
    """(train part, eval part) of a source; the eval part has weight 1 (each held-out record once)."""
    held = heldout_mask(source.name, source.valid_indices, fraction, seed)
    train = PlanSource(source.name, source.valid_indices[~held], source.weight)
    return train, PlanSource(source.name, source.valid_indices[held], 1.0)


def split_off_test(source: PlanSource, fraction: float, seed: int) -> tuple[PlanSource, PlanSource]:
    """(the rest, test part) of a source; the test part has weight 1 (each test record once)."""
    test = held_for_test(source.name, source.valid_indices, fraction, seed)
    rest = PlanSource(source.name, source.valid_indices[~test], source.weight)
    return rest, PlanSource(source.name, source.valid_indices[test], 1.0)


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([word & _MASK64 for word in words])


# Distinct streams of randomness drawn from the same seed.
_SUBSET, _SHUFFLE = 1, 2


class EpochPlan:
    """The order of (source id, record index) in every epoch; deterministic given sources, seed and shuffle."""

    def __init__(self, sources: Sequence[PlanSource], *, seed: int, shuffle: bool):
        names = [source.name for source in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        self.sources = list(sources)
        self.seed = seed
        self.shuffle = shuffle
        self.length = sum(source.count for source in self.sources)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        summary = hashlib.blake2b(digest_size=8)
        summary.update(json.dumps([names, [s.weight for s in sources], seed, shuffle]).encode())
        for source in self.sources:
            summary.update(np.ascontiguousarray(source.valid_indices, dtype=np.int64).tobytes())
        # Identifies the plan in saved states: a resume on changed data or settings is refused.
        self.fingerprint = summary.hexdigest()

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(source ids int32 [L], record indices int64 [L]) of the epoch, in reading order."""
        if epoch not in self._cache:
            if len(self._cache) >= 2:  # the current epoch and the next are all a stream looks at
                self._cache.pop(min(self._cache))
            self._cache[epoch] = self._build(epoch)
        return self._cache[epoch]

    def lookup(self, epoch: int, position: int) -> tuple[int, int]:
        source_ids, indices = self.epoch(epoch)
        return int(source_ids[position]), int(indices[position])

    def _build(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        source_ids, indices = [], []
        for number, source in enumerate(self.sources):
            valid = np.asarray(source.valid_indices, dtype=np.int64)
            whole = int(source.weight)
            extra = source.count - whole * len(valid)
            parts = [valid] * whole
            if extra > 0:
                chosen = _rng(self.seed, epoch, number, _SUBSET).choice(len(valid), size=extra, replace=False)
                parts.append(valid[np.sort(chosen)])
            picked = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            indices.append(picked)
            source_ids.append(np.full(len(picked), number, dtype=np.int32))
        all_ids = np.concatenate(source_ids) if source_ids else np.zeros(0, dtype=np.int32)
        all_indices = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
        if self.shuffle:
            order = _rng(self.seed, epoch, _SHUFFLE).permutation(len(all_ids))
            all_ids, all_indices = all_ids[order], all_indices[order]
        return all_ids, all_indices


class RowGroupPlan:
    """The order of the rows of prepared (already packed) shards: each epoch visits the row groups in a seeded random
    order (file order without shuffle) and the rows of a group in order, so a reader keeps one group at a time."""

    def __init__(self, group_sizes: Sequence[int], *, seed: int, shuffle: bool):
        self.group_sizes = np.asarray(group_sizes, dtype=np.int64)
        self.seed = seed
        self.shuffle = shuffle
        self.length = int(self.group_sizes.sum())
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        summary = json.dumps([self.group_sizes.tolist(), seed, shuffle]).encode()
        self.fingerprint = hashlib.blake2b(summary, digest_size=8).hexdigest()

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(row group ids int32 [L], row within the group int64 [L]) of the epoch, in reading order."""
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            groups = np.arange(len(self.group_sizes))
            if self.shuffle:
                groups = _rng(self.seed, epoch, _SHUFFLE).permutation(groups)
            sizes = self.group_sizes[groups]
            group_ids = np.repeat(groups.astype(np.int32), sizes)
            starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
            self._cache[epoch] = (group_ids, np.arange(self.length, dtype=np.int64) - starts)
        return self._cache[epoch]

    def lookup(self, epoch: int, position: int) -> tuple[int, int]:
        group_ids, rows = self.epoch(epoch)
        return int(group_ids[position]), int(rows[position])


class RankStream:
    """One rank's walk through the plan: its `pending` positions, then every world_size-th position of each epoch
    from `start_epoch` on, beginning at `rank`. Its state is the cursor; positions are read, never stored."""

    def __init__(self, length: int, rank: int, world_size: int, *, epochs: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        if epochs is None and length < world_size:
            raise ValueError(f"the plan has {length} samples per epoch, fewer than the {world_size} ranks")
        self.length = length
        self.rank = rank
        self.world_size = world_size
        self.epochs = epochs  # None = endless
        self.pending = np.zeros((0, 2), dtype=np.int64)  # [n, 2] (epoch, position), read first
        self.pending_cursor = 0
        self.start_epoch = 0
        self.stride_epoch = 0
        self.stride_step = 0  # the next strided position is rank + stride_step * world_size
        self._normalise()

    def _normalise(self) -> None:
        # Past this rank's last position of an epoch: the next epoch begins.
        while not self._past_end(self.stride_epoch) and self._next_strided()[1] >= self.length:
            self.stride_epoch += 1
            self.stride_step = 0

    def _past_end(self, epoch: int) -> bool:
        return self.epochs is not None and epoch >= self.epochs

    def _next_strided(self) -> tuple[int, int]:
        return self.stride_epoch, self.rank + self.stride_step * self.world_size

    @property
    def exhausted(self) -> bool:
        return self.pending_cursor >= len(self.pending) and self._past_end(self.stride_epoch)

    @property
    def epoch(self) -> int:
        """The epoch of the next position (epochs started so far - 1 on a fresh stream is 0)."""
        if self.pending_cursor < len(self.pending):
            return int(self.pending[self.pending_cursor, 0])
        return self.stride_epoch

    def positions(self) -> Iterator[tuple[int, int]]:
        """Every position from the cursor on, in order; does not move the cursor."""
        for epoch, position in self.pending[self.pending_cursor :].tolist():
            yield epoch, position
        epoch, step = self.stride_epoch, self.stride_step
        while not self._past_end(epoch):
            position = self.rank + step * self.world_size
            if position >= self.length:
                epoch, step = epoch + 1, 0
                continue
            yield epoch, position
            step += 1

    def advance(self, position: tuple[int, int]) -> None:
        """Mark the next position as read; it must be the one `positions()` gave next."""
        if self.pending_cursor < len(self.pending):
            expected = tuple(self.pending[self.pending_cursor].tolist())
            self.pending_cursor += 1
        else:
            if self._past_end(self.stride_epoch):
                raise RuntimeError("the stream is exhausted")
            expected = self._next_strided()
            self.stride_step += 1
            self._normalise()
        if tuple(position) != expected:
            raise RuntimeError(f"stream out of order: got position {tuple(position)}, expected {expected}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "rank": self.rank,
            "world_size": self.world_size,
            "epochs": self.epochs,
            "pending": torch.from_numpy(self.pending[self.pending_cursor :].copy()),
            "start_epoch": self.start_epoch,
            "stride_epoch": self.stride_epoch,
            "stride_step": self.stride_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("length", "rank", "world_size", "epochs"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"stream state has {key}={state[key]!r}, this stream {getattr(self, key)!r}"
                    + (
                        " (a resume on another world size goes through merge_states)"
                        if key != "length"
                        else ""
                    )
                )
        self.pending = state["pending"].numpy().astype(np.int64).reshape(-1, 2)
        self.pending_cursor = 0
        self.start_epoch = int(state["start_epoch"])
        self.stride_epoch = int(state["stride_epoch"])
        self.stride_step = int(state["stride_step"])
        self._normalise()


def _unread(state: dict[str, Any], last_epoch: int) -> np.ndarray:
    """[n, 2] positions a stream has not read: its pending ones and its strided ones up to `last_epoch`."""
    parts = [state["pending"].numpy().reshape(-1, 2)]
    rank, world, length = state["rank"], state["world_size"], state["length"]
    for epoch in range(state["stride_epoch"], last_epoch + 1):
        first_step = state["stride_step"] if epoch == state["stride_epoch"] else 0
        positions = np.arange(rank + first_step * world, length, world, dtype=np.int64)
        parts.append(np.stack([np.full_like(positions, epoch), positions], axis=1))
    return np.concatenate(parts).astype(np.int64)


def merge_stream_states(
    states: Sequence[dict[str, Any]], returned: Sequence[np.ndarray], new_world_size: int
) -> list[dict[str, Any]]:
    """Re-deal the unread part of every old rank's stream over a new world size, so that no position is read twice
    and none is skipped. `returned[r]` ([n, 2]) are positions rank r had read but not used (its packer's samples):
    they are read again. Everything unread of the epochs any rank has begun goes into the new ranks' `pending`
    lists, in plan order, dealt round robin; the strided streams restart at the first epoch nobody has begun."""
    world = len(states)
    if world == 0 or new_world_size < 1:
        raise ValueError(f"cannot merge {world} states into {new_world_size} ranks")
    first = states[0]
    for rank, state in enumerate(states):
        if state["rank"] != rank or state["world_size"] != world:
            raise ValueError(
                f"state {rank} is rank {state['rank']} of {state['world_size']}, expected {rank} of {world}"
            )
        for key in ("length", "epochs", "start_epoch"):
            if state[key] != first[key]:
                raise ValueError(f"states disagree on {key}: {state[key]!r} != {first[key]!r}")
    last = max(state["stride_epoch"] for state in states)
    begun = any(state["stride_epoch"] == last and state["stride_step"] > 0 for state in states)
    new_start = last + 1 if begun else last
    if first["epochs"] is not None:
        new_start = min(new_start, first["epochs"])
    parts = [_unread(state, new_start - 1) for state in states]
    parts += [np.asarray(positions, dtype=np.int64).reshape(-1, 2) for positions in returned]
    unread = np.concatenate(parts)
    unread = unread[np.lexsort((unread[:, 1], unread[:, 0]))]
    if len(unread) > 1 and bool(np.any(np.all(unread[1:] == unread[:-1], axis=1))):
        raise ValueError("the states list a position twice: they are not one consistent checkpoint")
    merged = []
    for rank in range(new_world_size):
        stream = RankStream(first["length"], rank, new_world_size, epochs=first["epochs"])
        stream.pending = unread[rank::new_world_size].copy()
        stream.start_epoch = stream.stride_epoch = new_start
        stream.stride_step = 0
        stream._normalise()
        merged.append(stream.state_dict())
    return merged
