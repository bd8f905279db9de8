"""One full pass over a run's training data (one epoch of the plan, as training would read it): the data report
behind `ift data stats / validate / prepare` — records and rejections, turns, token lengths, supervision, drops and
packing efficiency."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ift_dist.config import Config, ConfigError
from ift_dist.data.types import IGNORE_INDEX, PackedBatch, PackedRow

logger = logging.getLogger(__name__)

HISTOGRAM_BINS = 12


def tokenizer_path(config: Config) -> str:
    """data.tokenizer, else the model's own."""
    path = config.data.tokenizer or config.model.name_or_path
    if not path:
        raise ConfigError("data.tokenizer: set it (or model.name_or_path) to a tokenizer directory or hub id")
    return path


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
            messages[len(conversation.messages)] += 1
            assistant_turns += sum(message.role == "assistant" for message in conversation.messages)
            conversations += 1
    return {
        "messages_histogram": {str(count): number for count, number in sorted(messages.items())},
        "assistant_turns_mean": assistant_turns / max(conversations, 1),
    }


def analyze(
    config: Config,
    *,
    num_proc: int = 1,
    on_row: Callable[[PackedRow], None] | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Read one epoch of the training plan through the real loader (rendering in `num_proc` DataLoader workers),
    hand every packed row to `on_row`, and return the report as a plain dict (JSON-ready)."""
    from ift_dist.data.loader import build_loader, scan_sources
    from ift_dist.data.render import Renderer, load_tokenizer

    data = dataclasses.replace(
        config.data, num_workers=max(num_proc, 0) if num_proc > 1 else 0, prepared=None
    )
    if not data.sources:
        raise ConfigError("data.sources: no training data sources configured")
    tokenizer = tokenizer or load_tokenizer(tokenizer_path(config))
    scanned = scan_sources(data.sources, data.on_bad_record)
    renderer = Renderer(tokenizer, data)
    loader = build_loader(
        data, tokenizer, rank=0, world_size=1, rows_per_batch=64, epochs=1, scanned=scanned, renderer=renderer
    )
    lengths: list[int] = []
    total_tokens = supervised_tokens = 0
    for batch in loader:
        for row in batch_rows(batch):
            start = 0
            for length in row.seq_lens:
                lengths.append(length)
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
                "trimmed_trailing_turns": scan.trimmed_trailing_turns,
                "weight": item.weight,
                "planned": planned.get(scan.name, 0),
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
        },
        "turns": _turn_stats(scanned),
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
