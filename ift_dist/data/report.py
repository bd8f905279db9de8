"""One full pass over a run's training data (one epoch of the plan, as training would read it): the data report
behind `ift data stats / validate / prepare` — records and rejections, turns, token lengths, supervision, drops (each
dropped sample by record) and packing efficiency."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ift_dist.config import Config, ConfigError
from ift_dist.data.contracts import IGNORE_INDEX, Dropped, PackedBatch, PackedRow, TextDocument, TurnSamples

logger = logging.getLogger(__name__)

HISTOGRAM_BINS = 12


def batch_rows(batch: PackedBatch) -> Iterator[PackedRow]:
    """The rows of a collated batch, padding removed."""
    for number, (lens, refs) in enumerate(zip(batch.seq_lens, batch.refs, strict=True)):
        length = sum(lens)
        yield PackedRow(
            input_ids=batch.input_ids[number, :length].tolist(),
            labels=batch.labels[number, :length].tolist(),
            position_ids=batch.position_ids[number, :length].tolist(),
            seq_lens=list(lens),
            refs=list(refs),
        )


def _length_stats(lengths: np.ndarray) -> dict[str, Any]:
    if len(lengths) == 0:
        return {
            "min": 0,
            "p50": 0,
            "p90": 0,
            "p99": 0,
            "max": 0,
            "mean": 0.0,
            "histogram": {"edges": [], "counts": []},
        }
    edges = np.unique(np.linspace(0, int(lengths.max()), HISTOGRAM_BINS + 1).round().astype(np.int64))
    counts, edges = (
        np.histogram(lengths, bins=edges) if len(edges) > 1 else (np.array([len(lengths)]), [0, 1])
    )
    percentile = lambda q: int(np.percentile(lengths, q, method="lower"))  # noqa: E731
    return {
        "min": int(lengths.min()),
        "p50": percentile(50),
        "p90": percentile(90),
        "p99": percentile(99),
        "max": int(lengths.max()),
        "mean": float(lengths.mean()),
        "histogram": {"edges": [int(edge) for edge in edges], "counts": [int(c) for c in counts]},
    }


def _turn_stats(scanned: Sequence[Any]) -> dict[str, Any]:
    """Messages and assistant turns per valid conversation (a parse of every valid record, no tokenizing)."""
    messages: Counter[int] = Counter()
    assistant_turns = 0
    conversations = 0
    for item in scanned:
        for index in item.scan.valid_indices.tolist():
            conversation = item.source.get(index)
            if isinstance(conversation, TextDocument):  # format text: a document has no turns
                continue
            messages[len(conversation.messages)] += 1
            assistant_turns += sum(message.role == "assistant" for message in conversation.messages)
            conversations += 1
    return {
        "messages_histogram": {str(count): number for count, number in sorted(messages.items())},
        "assistant_turns_mean": assistant_turns / max(conversations, 1),
    }


def _record_location(item: Any, index: int) -> str:
    """Where record `index` of a scanned source is: its file when the source has one, and its 0-based index."""
    files = item.source.files
    return f"record {index} of {files[0]}" if len(files) == 1 else f"record {index} of {len(files)} files"


class _DropList:
    """Wraps the loader's reader and keeps every Dropped it yields (in the main process, whatever the number of
    rendering workers): one entry per record and reason, with how often the epoch drew it (weight > 1 repeats)."""

    def __init__(self, read: Callable[[Any], Iterator[Any]]):
        self.read = read
        self.drops: dict[tuple[Any, str, str], tuple[Dropped, int]] = {}

    def __call__(self, positions: Any) -> Iterator[Any]:
        for item in self.read(positions):
            result = item[2]
            # A per-turn conversation may drop some of its turns (data.multi_turn_mode): one entry per turn.
            drops = [result] if isinstance(result, Dropped) else []
            if isinstance(result, TurnSamples):
                drops = result.dropped
            for drop in drops:
                key = (drop.ref, drop.reason, drop.detail)
                first, times = self.drops.get(key, (drop, 0))
                self.drops[key] = (first, times + 1)
            yield item

    def entries(self, scanned: Sequence[Any]) -> list[dict[str, Any]]:
        by_name = {item.scan.name: item for item in scanned}
        return [
            {
                "ref": str(drop.ref),
                "source": drop.ref.source,
                "index": drop.ref.index,
                "where": _record_location(by_name[drop.ref.source], drop.ref.index),
                "reason": drop.reason,
                "detail": drop.detail,
                "times": times,
            }
            for drop, times in sorted(self.drops.values(), key=lambda entry: (entry[0].reason, entry[0].ref))
        ]


def analyze(
    config: Config,
    *,
    num_proc: int = 1,
    on_row: Callable[[PackedRow], None] | None = None,
    tokenizer: Any = None,
    scanned: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Read one epoch of the training plan through the real loader (rendering in `num_proc` DataLoader workers),
    hand every packed row to `on_row`, and return the report as a plain dict (JSON-ready). `scanned`: the training
    sources from `loader.scan_sources`, when the caller has scanned them already (each source is scanned once)."""
    from ift_dist.data.loader import build_loader
    from ift_dist.data.quality.stage import quality_dir, scan_training_sources
    from ift_dist.data.render import Renderer, load_tokenizer

    data = dataclasses.replace(
        config.data, num_workers=max(num_proc, 0) if num_proc > 1 else 0, prepared=None
    )
    if not data.sources:
        raise ConfigError("data.sources: no training data sources configured")
    tokenizer = tokenizer or load_tokenizer(config.tokenizer_path)

    if scanned is None:
        scanned = scan_training_sources(data, tokenizer=tokenizer, work_dir=quality_dir(config.output_dir))
    renderer = Renderer(tokenizer, data)
    loader = build_loader(
        data, tokenizer, rank=0, world_size=1, rows_per_batch=64, epochs=1, scanned=scanned, renderer=renderer
    )
    drop_list = _DropList(loader.read)
    loader.read = drop_list  # the loader counts drops by reason; the report also names each dropped record
    lengths: list[int] = []
    total_tokens = supervised_tokens = 0
    # Per source: tokens and supervised tokens of its samples as packed (a text source supervises nearly all).
    source_tokens: dict[str, Counter[str]] = {}
    for batch in loader:
        for row in batch_rows(batch):
            start = 0
            for length, ref in zip(row.seq_lens, row.refs, strict=True):
                lengths.append(length)
                supervised = sum(label != IGNORE_INDEX for label in row.labels[start : start + length])
                source_tokens.setdefault(ref.source, Counter()).update(tokens=length, supervised=supervised)
                start += length
            total_tokens += len(row)
            supervised_tokens += sum(label != IGNORE_INDEX for label in row.labels)
            if on_row is not None:
                on_row(row)
    counts = loader.report()
    planned = {source.name: source.count for source in loader.plan.sources}
    sources = []
    for item in scanned:
        scan = item.scan
        formats = sorted(set(scan.formats.values()))
        sources.append(
            {
                "name": scan.name,
                "format": "/".join(formats) or "-",
                "records": scan.num_records,
                "valid": len(scan.valid_indices),
                "bad": sum(scan.bad_counts.values()),
                "bad_by_reason": dict(scan.bad_counts),
                "filtered": scan.filtered,
                "quality_removed": len(item.removals),
                "trimmed_trailing_turns": scan.trimmed_trailing_turns,
                "weight": item.weight,
                "planned": planned.get(scan.name, 0),
                "tokens": source_tokens.get(scan.name, Counter())["tokens"],
                "supervised_tokens": source_tokens.get(scan.name, Counter())["supervised"],
            }
        )
    bad_by_reason: Counter[str] = Counter()
    for item in scanned:
        bad_by_reason.update(item.scan.bad_counts)
    dropped = counts["dropped"]
    rows = counts["rows"]
    return {
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "sources": sources,
        "bad_records_by_reason": dict(bad_by_reason),
        "bad_record_examples": [str(bad) for item in scanned for bad in item.scan.bad[:20]],
        "samples": {
            "rendered": counts["samples"],
            "dropped": sum(dropped.values()),
            "dropped_by_reason": dict(dropped),
            "truncated": counts["truncated"],
            "dropped_turns": counts["dropped_turns"],
            "with_dropped_turns": counts.get("samples_with_dropped_turns", 0),
            # data.multi_turn_mode: conversations rendered as one sample per assistant turn, and those samples.
            "per_turn_conversations": counts["per_turn"]["conversations"],
            "per_turn_samples": counts["per_turn"]["samples"],
            # format text: documents read and the max_length chunks (samples) they became.
            "text_documents": counts["text"]["documents"],
            "text_chunks": counts["text"]["chunks"],
        },
        # Every dropped sample: ref ("source:index"), source, index, where (file and record), reason, detail, and
        # times (how often one epoch draws the record: its weight).
        "dropped_samples": drop_list.entries(scanned),
        "turns": _turn_stats(scanned),
        # data.quality: records removed per reason, and every removal (ref, reason, matched, detail).
        "quality": quality_stats(scanned),
        "lengths": _length_stats(np.asarray(lengths, dtype=np.int64)),
        "tokens": {
            "total": total_tokens,
            "supervised": supervised_tokens,
            "supervised_ratio": supervised_tokens / max(total_tokens, 1),
        },
        "packing": {
            "enabled": data.packing,
            "max_length": data.max_length,
            "buffer": data.pack_buffer,
            "rows": rows,
            "efficiency": counts["packing_efficiency"] if rows else 0.0,
            "samples_per_row": counts["samples"] / max(rows, 1),
        },
    }


def quality_stats(scanned: Sequence[Any]) -> dict[str, Any]:
    """data.quality's removals of scanned sources: how many, by reason (most first), and each one as JSON."""
    by_reason: Counter[str] = Counter()
    removed = []
    for item in scanned:
        by_reason.update(removal.reason for removal in item.removals)
        removed.extend(removal.to_json() for removal in item.removals)
    return {
        "removed": sum(by_reason.values()),
        "by_reason": dict(by_reason.most_common()),
        "removals": removed,
    }
