"""Packs rendered samples into rows of at most max_length tokens (best-fit decreasing in a bounded streaming buffer).

Streaming rule: samples wait in a buffer of `buffer_size`. When it is full, the buffered samples are packed with
best-fit decreasing (longest first, each into the row with the least room that still fits it). Full rows are emitted;
rows with room left stay buffered, least-filled first, as long as they hold at most half the buffer, so their samples
meet the next arrivals and each round still frees at least half the buffer; the other rows are emitted. `flush()` packs
the rest at the end.
The result depends only on the input order, the lengths and the two sizes: ties are broken by arrival order.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ift_dist.data.contracts import IGNORE_INDEX, PackedRow, RenderedSample, SampleRef

logger = logging.getLogger(__name__)

# Where a sample sits in the plan: (epoch, position). (-1, -1) when the caller does not track it.
NO_POSITION = (-1, -1)


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: items taken longest first (ties: lower index first), each put into the open bin with
    the least room left that still fits it, else into a new bin. Bins are in creation order."""
    order = sorted(range(len(lengths)), key=lambda item: (-lengths[item], item))
    bins: list[list[int]] = []
    # Open bins sorted by (room left, bin number): bisect finds the tightest bin that fits in O(log bins).
    rooms: list[tuple[int, int]] = []
    for item in order:
        length = lengths[item]
        if length > capacity:
            raise ValueError(f"item of length {length} does not fit a row of {capacity}")
        slot = bisect.bisect_left(rooms, (length, -1))
        if slot < len(rooms):
            room, number = rooms.pop(slot)
        else:
            room, number = capacity, len(bins)
            bins.append([])
        bins[number].append(item)
        room -= length
        if room > 0:
            bisect.insort(rooms, (room, number))
    return bins


def efficiency(stats: dict[str, int], max_length: int) -> float:
    """Real tokens / (rows x max_length); 1.0 before the first row."""
    return stats.get("tokens", 0) / (stats["rows"] * max_length) if stats.get("rows") else 1.0


def make_row(samples: Sequence[RenderedSample]) -> PackedRow:
    """Samples laid end to end: position ids restart at 0 per sample and every sample's first label is IGNORE_INDEX,
    so the last token of one sample is never trained to predict the first token of the next."""
    row = PackedRow(input_ids=[], labels=[], position_ids=[], seq_lens=[], refs=[])
    for sample in samples:
        length = len(sample.input_ids)
        if length == 0 or len(sample.labels) != length:
            raise ValueError(f"sample {sample.ref}: {length} tokens and {len(sample.labels)} labels")
        row.input_ids.extend(sample.input_ids)
        row.labels.append(IGNORE_INDEX)
        row.labels.extend(sample.labels[1:])
        row.position_ids.extend(range(length))
        row.seq_lens.append(length)
        row.refs.append(sample.ref)
    return row


@dataclass
class _Entry:
    sample: RenderedSample
    position: tuple[int, int]
    order: int  # arrival number: the tie breaker that keeps packing deterministic


class StreamingPacker:
    """Turns a stream of samples into packed rows (or one padded sample per row with packing=False).

    `add()` samples, take rows with `pop()` while `ready`; `flush()` at the end of a finite stream. The state holds
    the buffered samples and the rows built but not yet taken, with their tokens, so a restore continues exactly."""

    def __init__(self, max_length: int, buffer_size: int, *, packing: bool = True):
        if max_length < 1 or buffer_size < 1:
            raise ValueError(f"max_length ({max_length}) and buffer_size ({buffer_size}) must be >= 1")
        self.max_length = max_length
        self.buffer_size = buffer_size
        self.packing = packing
        self._buffer: list[_Entry] = []
        self._rows: deque[list[_Entry]] = deque()
        self._next_order = 0
        # What left in rows taken by pop(): rows, tokens, samples, truncated, dropped_turns,
        # samples_with_dropped_turns. Counted on the way out, so a sample handed back on a resume counts once.
        self.stats: Counter[str] = Counter()

    # ----------------------------------------------------------------------------------------------- stream

    def add(self, sample: RenderedSample, position: tuple[int, int] = NO_POSITION) -> None:
        if not 0 < len(sample.input_ids) <= self.max_length:
            raise ValueError(
                f"sample {sample.ref} has {len(sample.input_ids)} tokens, max_length {self.max_length}"
            )
        entry = _Entry(sample, (int(position[0]), int(position[1])), self._next_order)
        self._next_order += 1
        if not self.packing:
            self._rows.append([entry])
            return
        self._buffer.append(entry)
        if len(self._buffer) >= self.buffer_size:
            self._pack(final=False)

    def add_packed(self, samples: Sequence[RenderedSample], position: tuple[int, int] = NO_POSITION) -> None:
        """A row packed elsewhere (prepared shards): it waits for `pop()` as it is."""
        if sum(len(sample.input_ids) for sample in samples) > self.max_length:
            raise ValueError(
                f"a packed row of {[len(s.input_ids) for s in samples]} tokens exceeds {self.max_length}"
            )
        self._rows.append(
            [_Entry(sample, position, self._next_order + number) for number, sample in enumerate(samples)]
        )
        self._next_order += len(samples)

    def flush(self) -> None:
        """Pack every buffered sample (end of a finite stream)."""
        if self._buffer:
            self._pack(final=True)

    @property
    def ready(self) -> int:
        """Rows built and waiting for `pop()`."""
        return len(self._rows)

    @property
    def buffered(self) -> int:
        """Samples waiting to be packed."""
        return len(self._buffer)

    def pop(self) -> PackedRow:
        samples = [entry.sample for entry in self._rows.popleft()]
        row = make_row(samples)
        self.stats.update(
            rows=1,
            tokens=len(row),
            samples=len(samples),
            truncated=sum(sample.truncated for sample in samples),
            dropped_turns=sum(sample.dropped_turns for sample in samples),
            samples_with_dropped_turns=sum(sample.dropped_turns > 0 for sample in samples),
        )
        return row

    @property
    def efficiency(self) -> float:
        """Real tokens / (rows x max_length) over the rows taken so far (1.0 before the first)."""
        return efficiency(self.stats, self.max_length)

    def held_positions(self) -> list[tuple[int, int]]:
        """Plan positions of every sample added but not yet taken out in a row (buffered or in a waiting row)."""
        return [entry.position for entry in self._held()]

    def _held(self) -> list[_Entry]:
        return [entry for row in self._rows for entry in row] + self._buffer

    def _pack(self, *, final: bool) -> None:
        entries = self._buffer
        bins = best_fit_decreasing([len(entry.sample.input_ids) for entry in entries], self.max_length)
        keep: set[int] = set()
        if not final:
            fills = [sum(len(entries[item].sample.input_ids) for item in members) for members in bins]
            kept = 0
            # Least filled first; among equals the newest, whose samples are the smallest.
            for number in sorted(range(len(bins)), key=lambda number: (fills[number], -number)):
                if fills[number] >= self.max_length or 2 * (kept + len(bins[number])) > self.buffer_size:
                    break
                keep.add(number)
                kept += len(bins[number])
        for number, members in enumerate(bins):
            if number not in keep:
                self._rows.append([entries[item] for item in members])
        self._buffer = [entries[item] for number in sorted(keep) for item in sorted(bins[number])]

    # ----------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        held = self._held()
        row_of = [number for number, row in enumerate(self._rows) for _ in row] + [-1] * len(self._buffer)
        samples = [entry.sample for entry in held]
        return {
            "max_length": self.max_length,
            "buffer_size": self.buffer_size,
            "packing": self.packing,
            "next_order": self._next_order,
            "stats": dict(self.stats),
            "row": torch.tensor(row_of, dtype=torch.int64),
            "order": torch.tensor([entry.order for entry in held], dtype=torch.int64),
            "positions": torch.tensor([entry.position for entry in held], dtype=torch.int64).reshape(-1, 2),
            "lengths": torch.tensor([len(sample.input_ids) for sample in samples], dtype=torch.int64),
            "input_ids": torch.tensor([t for sample in samples for t in sample.input_ids], dtype=torch.int32),
            "labels": torch.tensor([t for sample in samples for t in sample.labels], dtype=torch.int32),
            "refs": [str(sample.ref) for sample in samples],
            "dropped_turns": torch.tensor([sample.dropped_turns for sample in samples], dtype=torch.int64),
            "truncated": torch.tensor([sample.truncated for sample in samples], dtype=torch.bool),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("max_length", "buffer_size", "packing"):
            if state[key] != getattr(self, key):
                raise ValueError(f"packer state has {key}={state[key]!r}, this packer {getattr(self, key)!r}")
        self._next_order = int(state["next_order"])
        self.stats = Counter(state["stats"])
        ids = state["input_ids"].tolist()
        labels = state["labels"].tolist()
        rows: dict[int, list[_Entry]] = {}
        self._buffer = []
        start = 0
        for item, length in enumerate(state["lengths"].tolist()):
            sample = RenderedSample(
                input_ids=ids[start : start + length],
                labels=labels[start : start + length],
                ref=SampleRef.parse(state["refs"][item]),
                dropped_turns=int(state["dropped_turns"][item]),
                truncated=bool(state["truncated"][item]),
            )
            start += length
            position = tuple(state["positions"][item].tolist())
            entry = _Entry(sample, position, int(state["order"][item]))
            number = int(state["row"][item])
            if number < 0:
                self._buffer.append(entry)
            else:
                rows.setdefault(number, []).append(entry)
        self._rows = deque(rows[number] for number in sorted(rows))
