"""Streams one rank's batches of packed rows, resumably: plan positions -> records rendered in DataLoader workers
(or rows of prepared shards) -> packer -> PackedBatch.

The DataLoader only renders: its sampler yields this rank's plan positions from the cursor and results come back in
order, so the batches do not depend on the number of workers. Packing, the cursor and the counters live in the main
process; between two batches they are complete, which is what `state_dict()` saves.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ift_dist.config import DataConfig
from ift_dist.data.contracts import (
    IGNORE_INDEX,
    BadRecord,
    BadRecordError,
    Dropped,
    PackedBatch,
    PackedRow,
    RenderedSample,
    TextSamples,
    TurnSamples,
)
from ift_dist.data.pack import StreamingPacker
from ift_dist.data.plan import (
    EpochPlan,
    PlanSource,
    RankStream,
    RowGroupPlan,
    merge_stream_states,
    split_heldout,
    split_off_test,
)
from ift_dist.data.prepared import PreparedReader
from ift_dist.data.render import pad_token_id
from ift_dist.data.scan import ScannedSource, scan_sources

logger = logging.getLogger(__name__)

Item = tuple[
    int, int, Any
]  # (epoch, position, RenderedSample | TurnSamples | Dropped | BadRecord | a prepared row's samples)


def collate(rows: Sequence[PackedRow], pad_id: int, width: int | None = None) -> PackedBatch:
    """Rows -> [rows, T] tensors, T = `width` or the longest row; padding at the end of each row."""
    width = width or max(len(row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    for number, row in enumerate(rows):
        length = len(row)
        input_ids[number, :length] = torch.tensor(row.input_ids)
        labels[number, :length] = torch.tensor(row.labels)
        position_ids[number, :length] = torch.tensor(row.position_ids)
    return PackedBatch(
        input_ids, labels, position_ids, [row.seq_lens for row in rows], [row.refs for row in rows]
    )


# --------------------------------------------------------------------------------------------- reading records


class RenderDataset(Dataset):
    """Map-style: an item (epoch, position, source id, record index) -> (epoch, position, rendered result)."""

    def __init__(
        self, sources: Sequence[Any], render: Callable[[Any], RenderedSample | TurnSamples | Dropped]
    ):
        self.sources = list(sources)
        self.render = render

    def __getitem__(self, item: tuple[int, int, int, int]) -> Item:
        epoch, position, source_id, index = item
        record = self.sources[source_id].get(index)
        return epoch, position, record if isinstance(record, BadRecord) else self.render(record)


class _PlanItems:
    """The DataLoader's sampler: this rank's positions from the cursor, with the record each one names."""

    def __init__(self, plan: EpochPlan, positions: Iterator[tuple[int, int]]):
        self.plan = plan
        self.positions = positions

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        for epoch, position in self.positions:
            yield (epoch, position, *self.plan.lookup(epoch, position))


def _identity(item: Any) -> Any:
    return item


class RecordReader:
    """Renders the records at a stream of positions, in order, in `num_workers` DataLoader workers (0 = here)."""

    def __init__(self, dataset: RenderDataset, plan: EpochPlan, num_workers: int):
        self.dataset, self.plan, self.num_workers = dataset, plan, num_workers

    def __call__(self, positions: Iterator[tuple[int, int]]) -> Iterator[Item]:
        items = _PlanItems(self.plan, positions)
        if self.num_workers == 0:
            return (self.dataset[item] for item in items)
        # Fast tokenizers warn and turn their thread pool off in forked workers; say so up front instead.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = DataLoader(
            self.dataset, batch_size=None, sampler=items, num_workers=self.num_workers, collate_fn=_identity
        )
        return iter(loader)


# --------------------------------------------------------------------------------------------- the loader


class PackedLoader:
    """Iterating yields this rank's PackedBatches: endless for training (epochs=None), else until `epochs` are
    read (eval, prepare). A finite loader starts over at every iteration, except the first after a restore."""

    def __init__(
        self,
        read: RecordReader | PreparedReader,
        plan: EpochPlan | RowGroupPlan,
        cfg: DataConfig,
        *,
        rank: int,
        world_size: int,
        rows_per_batch: int,
        pad_id: int = 0,
        epochs: int | None = None,
        scan_report: dict[str, Any] | None = None,
    ):
        if rows_per_batch < 1:
            raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
        self.read, self.plan, self.cfg = read, plan, cfg
        self.kind = "prepared" if isinstance(read, PreparedReader) else "records"
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.rows_per_batch, self.pad_id = rows_per_batch, pad_id
        self.scan_report = scan_report or {}
        self._generation = 0
        self._restored = False
        self.reset()

    def reset(self) -> None:
        """Back to the start of the plan, counters cleared."""
        self.stream = RankStream(self.plan.length, self.rank, self.world_size, epochs=self.epochs)
        self.packer = StreamingPacker(self.cfg.max_length, self.cfg.pack_buffer, packing=self.cfg.packing)
        self.counters = _new_counters()
        self._generation += 1

    def __iter__(self) -> Iterator[PackedBatch]:
        if self.epochs is not None and not self._restored:
            self.reset()
        self._restored = False
        self._generation += 1
        generation = self._generation
        items = self.read(self.stream.positions())
        width = self.cfg.max_length if self.cfg.pad_to_max_length else None
        since_sample = 0
        while True:
            while self.packer.ready < self.rows_per_batch:
                item = next(items, None)
                if item is None:
                    self.packer.flush()
                    break
                since_sample = 0 if self._consume(*item) else since_sample + 1
                if since_sample > self.plan.length:
                    raise RuntimeError(
                        f"a whole epoch ({self.plan.length} records) gave no sample: {self.report()}"
                    )
            if self.packer.ready == 0:
                return
            rows = [self.packer.pop() for _ in range(min(self.rows_per_batch, self.packer.ready))]
            yield collate(rows, self.pad_id, width)
            if generation != self._generation:
                raise RuntimeError("the loader was reset or restored during this iteration; iterate it anew")

    def _consume(self, epoch: int, position: int, result: Any) -> bool:
        """Account for one item; True if it gave a sample (or a prepared row)."""
        self.stream.advance((epoch, position))
        if isinstance(result, list):  # the samples of a prepared row
            self.packer.add_packed(result, (epoch, position))
        elif isinstance(result, RenderedSample):
            self.packer.add(result, (epoch, position))
        elif isinstance(result, TurnSamples | TextSamples):
            # Independent samples of one record, in order, sharing its position: a conversation's per-turn samples
            # (data.multi_turn_mode) or a raw-text document's max_length chunks (format text).
            for sample in result.samples:
                self.packer.add(sample, (epoch, position))
            if isinstance(result, TurnSamples):
                self.counters["dropped"].update(dropped.reason for dropped in result.dropped)
                self.counters["per_turn"].update(conversations=1, samples=len(result.samples))
            else:
                self.counters["text"].update(documents=1, chunks=len(result.samples))
            return bool(result.samples)
        elif isinstance(result, Dropped):
            self.counters["dropped"][result.reason] += 1
        elif isinstance(result, BadRecord):
            # The build-time scan finds every bad record; this one changed since (or a reader disagrees).
            if self.cfg.on_bad_record == "error":
                raise BadRecordError(result)
            self.counters["bad_records"][result.reason] += 1
        else:
            raise TypeError(f"unexpected item from the reader: {type(result).__name__}")
        return isinstance(result, RenderedSample | list)

    def report(self) -> dict[str, Any]:
        """This rank's counts (sum them over ranks): rows, tokens, samples, truncated, dropped_turns,
        samples_with_dropped_turns (of the rows yielded), dropped and bad_records by reason (of the records read),
        per_turn (conversations split into one sample per assistant turn, and the samples they gave, as read),
        text (raw-text documents read and the max_length chunks they gave);
        its packing efficiency and the epoch of its next sample; the build-time scan (the same on every rank)."""
        return {
            **{key: 0 for key in ("rows", "tokens", "samples", "truncated", "dropped_turns")},
            **self.packer.stats,
            "dropped": dict(self.counters["dropped"]),
            "bad_records": dict(self.counters["bad_records"]),
            "per_turn": {"conversations": 0, "samples": 0, **self.counters["per_turn"]},
            "text": {"documents": 0, "chunks": 0, **self.counters["text"]},
            "packing_efficiency": self.packer.efficiency,
            "epoch": self.stream.epoch,
            "scan": self.scan_report,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "plan": self.plan.fingerprint,
            "stream": self.stream.state_dict(),
            "packer": self.packer.state_dict(),
            "counters": {name: dict(counter) for name, counter in self.counters.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind or state["plan"] != self.plan.fingerprint:
            raise ValueError(
                f"loader state is for another data plan ({state['kind']} {state['plan']}, this loader "
                f"{self.kind} {self.plan.fingerprint}): the data, weights, seed or eval split changed"
            )
        self.stream.load_state_dict(state["stream"])
        self.packer.load_state_dict(state["packer"])
        self.counters = _new_counters(state["counters"])
        self._generation += 1
        self._restored = True


# What a loader counts of the records it reads (what became samples the packer counts as rows leave it): records that
# gave no sample, by reason; conversations read as per-turn samples; raw-text documents. Every state has them all: a
# counter added since, or one a rank never touched, starts at zero (a merge over ranks needs the same names).
COUNTERS = ("dropped", "bad_records", "per_turn", "text")


def _new_counters(saved: dict[str, dict[str, int]] | None = None) -> dict[str, Counter[str]]:
    return {name: Counter((saved or {}).get(name, {})) for name in COUNTERS}


def merge_states(states: Sequence[dict[str, Any]], new_world_size: int) -> list[dict[str, Any]]:
    """Every old rank's loader state -> the states of `new_world_size` ranks (a resume on another world size).

    Positions not read yet, and samples read but still in a packer, are re-dealt over the new ranks, so over the
    epoch no sample is repeated or skipped. Counts are summed into the new rank 0 (their sum over ranks holds)."""
    first = states[0]
    if any((state["kind"], state["plan"]) != (first["kind"], first["plan"]) for state in states):
        raise ValueError("the loader states come from different data plans")
    # The samples of one prepared row share its position: hand each position back once.
    returned = [np.unique(state["packer"]["positions"].numpy().reshape(-1, 2), axis=0) for state in states]
    streams = merge_stream_states([state["stream"] for state in states], returned, new_world_size)
    stats: Counter[str] = Counter()
    counters = _new_counters()
    for state in states:
        stats.update(state["packer"]["stats"])
        for name, values in state["counters"].items():
            counters[name].update(values)
    packer_options = first["packer"]
    merged = []
    for rank, stream in enumerate(streams):
        packer = StreamingPacker(
            packer_options["max_length"], packer_options["buffer_size"], packing=packer_options["packing"]
        )
        if rank == 0:
            packer.stats = stats
        mine = counters if rank == 0 else _new_counters()
        merged.append(
            {
                "kind": first["kind"],
                "plan": first["plan"],
                "stream": stream,
                "packer": packer.state_dict(),
                "counters": {name: dict(counter) for name, counter in mine.items()},
            }
        )
    return merged


# --------------------------------------------------------------------------------------------- building


def _scan_report(scanned: Sequence[ScannedSource]) -> dict[str, Any]:
    return {
        item.scan.name: {
            "records": item.scan.num_records,
            "valid": len(item.scan.valid_indices),
            "bad": dict(item.scan.bad_counts),
            "filtered": item.scan.filtered,
        }
        for item in scanned
    }


def build_loader(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    rank: int,
    world_size: int,
    rows_per_batch: int,
    split: str = "train",
    epochs: int | None = None,
    scanned: Sequence[ScannedSource] | None = None,
    renderer: Any = None,
) -> PackedLoader:
    """The loader of one rank. split "train": endless (unless `epochs`), mixed by weight, shuffled per epoch,
    eval records held out; from `cfg.prepared` shards when set. split "eval": one pass, in order, over
    `cfg.eval_sources`, else over the records `cfg.eval_fraction` holds out. `scanned`: the sources of this split
    (train: cfg.sources, eval: cfg.eval_sources or cfg.sources) from `scan_sources`, to scan only once."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    epochs = epochs if split == "train" else 1
    options = {"rank": rank, "world_size": world_size, "rows_per_batch": rows_per_batch, "epochs": epochs}
    options["pad_id"] = pad_token_id(tokenizer)
    if split == "train" and cfg.prepared:
        reader = PreparedReader(cfg.prepared, seed=cfg.seed, shuffle=cfg.shuffle)
        return PackedLoader(reader, reader.plan, cfg, **options)

    eval_from_sources = split == "eval" and bool(cfg.eval_sources)
    if split == "eval" and not eval_from_sources and cfg.eval_fraction <= 0:
        raise ValueError("no eval data: set data.eval_sources or data.eval_fraction")
    if scanned is None and eval_from_sources:
        scanned = scan_sources(cfg.eval_sources, cfg.on_bad_record)
    elif (
        scanned is None
    ):  # the training sources, data.quality applied (held-out records come from the kept ones)
        from ift_dist.data.quality.stage import scan_training_sources

        scanned = scan_training_sources(cfg, tokenizer=tokenizer)
    plan_sources = [PlanSource(item.scan.name, item.scan.valid_indices, item.weight) for item in scanned]
    if eval_from_sources:
        plan_sources = [PlanSource(source.name, source.valid_indices, 1.0) for source in plan_sources]
    else:
        # data.test_fraction: out of training and of the eval split (written out by ift_dist.data.holdout).
        plan_sources = [split_off_test(source, cfg.test_fraction, cfg.seed)[0] for source in plan_sources]
    if not eval_from_sources and cfg.eval_fraction > 0:
        parts = [split_heldout(source, cfg.eval_fraction, cfg.seed) for source in plan_sources]
        plan_sources = [train if split == "train" else held for train, held in parts]
    plan = EpochPlan(plan_sources, seed=cfg.seed, shuffle=cfg.shuffle and split == "train")
    if plan.length == 0:
        raise ValueError(f"the {split} split has no valid records: {_scan_report(scanned)}")
    if renderer is None:
        from ift_dist.data.render import Renderer

        renderer = Renderer(tokenizer, cfg)
    dataset = RenderDataset([item.source for item in scanned], renderer.render)
    reader = RecordReader(dataset, plan, cfg.num_workers)
    logger.info(
        "%s loader, rank %d/%d: %d samples per epoch from %s",
        split, rank, world_size, plan.length, ", ".join(f"{s.name} x{s.weight:g}" for s in plan_sources),
    )  # fmt: skip
    return PackedLoader(reader, plan, cfg, scan_report=_scan_report(scanned), **options)
