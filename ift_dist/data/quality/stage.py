"""Runs the configured quality stages over scanned training sources: which valid records are kept, and every
removal with its reason and what it matched.

Order: filters, model score, exact dedup, near dedup, decontamination, balance. A stage sees only what the earlier
ones kept, so each removal has exactly one reason (the first that applies) and the counts add up. Records are
visited in priority order: the sources of `dedup.priority` first, then the others in config order, each in record
order; a duplicate always loses to the record visited first, so the kept set depends only on the config and the
data, never on workers or ranks.

Inside training rank 0 computes the result (`run_quality`) and every rank applies the same removals
(`QualityResult.apply`): the model score is paid once and every rank keeps the same records.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ift_dist.config import DataConfig, QualityConfig
from ift_dist.data.contracts import Conversation
from ift_dist.data.quality.texts import QualityText, Removal

logger = logging.getLogger(__name__)


def quality_active(cfg: QualityConfig) -> bool:
    """Whether any stage is configured (otherwise nothing is read twice)."""
    from ift_dist.data.quality.filters import active_rules

    return bool(
        active_rules(cfg.filters)
        or cfg.model_score.url
        or cfg.dedup.exact
        or cfg.dedup.near
        or cfg.decontaminate
        or (cfg.balance.by and (cfg.balance.max_per_group or cfg.balance.weights))
    )


@dataclass
class QualityResult:
    """What the stages decided: every removal (in visiting order), near-duplicate clusters, counters, seconds."""

    removals: list[Removal] = field(default_factory=list)
    clusters: list[list[str]] = field(default_factory=list)
    # data.quality.balance.weights: (source, index) -> how many times one pass over the source reads the record
    # (only records whose count is not 1).
    copies: dict[tuple[str, int], int] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """source -> reason -> records removed."""
        by_source: dict[str, Counter] = {}
        for removal in self.removals:
            by_source.setdefault(removal.ref.source, Counter())[removal.reason] += 1
        return {source: dict(counter.most_common()) for source, counter in by_source.items()}

    def apply(self, scanned: Sequence[Any]) -> None:
        """Takes the removed records out of each scan's valid indices and hands each ScannedSource its removals."""
        by_source: dict[str, list[Removal]] = {}
        for removal in self.removals:
            by_source.setdefault(removal.ref.source, []).append(removal)
        for item in scanned:
            mine = by_source.get(item.scan.name, [])
            if mine:
                gone = np.asarray(sorted(r.ref.index for r in mine), dtype=np.int64)
                item.scan.valid_indices = np.setdiff1d(item.scan.valid_indices, gone, assume_unique=True)
            item.removals = mine
            if self.copies:  # a record of weight w is listed w times: the epoch plan reads each listing once
                name, valid = item.scan.name, item.scan.valid_indices
                counts = np.asarray([self.copies.get((name, i), 1) for i in valid.tolist()], dtype=np.int64)
                item.scan.valid_indices = np.repeat(valid, counts)

    def to_json(self) -> dict[str, Any]:
        return {
            "removed": self.counts(),
            "clusters": len(self.clusters),
            "counters": self.counters,
            "seconds": {name: round(value, 3) for name, value in self.seconds.items()},
        }


def visiting_order(scanned: Sequence[Any], priority: Sequence[str]) -> list[Any]:
    """The sources in dedup priority order: those named in `priority` first (in its order), then the rest."""
    names = [item.scan.name for item in scanned]
    unknown = [name for name in priority if name not in names]
    if unknown:
        raise ValueError(f"data.quality.dedup.priority: no source named {unknown} (sources: {names})")
    rank = {name: position for position, name in enumerate(priority)}
    return sorted(scanned, key=lambda item: rank.get(item.scan.name, len(rank)))


def _texts(ordered: Sequence[Any], removed: set[tuple[str, int]]) -> Iterator[QualityText]:
    for item in ordered:
        for index in item.scan.valid_indices.tolist():
            if (item.scan.name, index) in removed:
                continue
            record = item.source.get(index)
            if isinstance(record, Conversation):
                yield QualityText.of(record)


def run_quality(
    scanned: Sequence[Any],
    data: DataConfig,
    *,
    tokenizer: Any = None,
    workers: int = 1,
    work_dir: str | Path | None = None,
) -> QualityResult:
    """Every configured stage over the valid records of `scanned` (training sources); nothing is changed in them
    (QualityResult.apply does that). work_dir: where the model-score cache and near-dedup signatures go."""
    cfg = data.quality
    result = QualityResult()
    if not quality_active(cfg):
        return result
    ordered = visiting_order(scanned, cfg.dedup.priority)
    removed: set[tuple[str, int]] = set()
    work = Path(work_dir) if work_dir is not None else None

    def record(removals: Sequence[Removal], stage: str, started: float) -> None:
        for removal in removals:
            removed.add((removal.ref.source, removal.ref.index))
        result.removals.extend(removals)
        result.seconds[stage] = time.perf_counter() - started
        logger.info("quality %s: %d records removed in %.1f s", stage, len(removals), result.seconds[stage])

    from ift_dist.data.quality.filters import Filters, active_rules

    if active_rules(cfg.filters):
        started = time.perf_counter()
        filters = Filters(cfg.filters, tokenizer)
        record([r for r in map(filters.check, _texts(ordered, removed)) if r is not None], "filters", started)
    if cfg.model_score.url:
        from ift_dist.data.quality.score import score_texts

        started = time.perf_counter()
        cache = (
            Path(cfg.model_score.cache) if cfg.model_score.cache else _work_file(work, "score_cache.jsonl")
        )
        scores = score_texts(list(_texts(ordered, removed)), cfg.model_score, cache)
        result.counters["model_score"] = scores.counters
        record(scores.removals, "model_score", started)
    if cfg.dedup.exact:
        from ift_dist.data.quality.dedup import exact_duplicates

        started = time.perf_counter()
        record(exact_duplicates(_texts(ordered, removed), cfg.dedup), "exact_dedup", started)
    if cfg.dedup.near:
        from ift_dist.data.quality.dedup import near_duplicates

        started = time.perf_counter()
        near = near_duplicates(_texts(ordered, removed), cfg.dedup, workers=workers, spill_dir=work)
        result.clusters = [[str(ref) for ref in cluster] for cluster in near.clusters]
        record(near.removals, "near_dedup", started)
    if cfg.decontaminate:
        from ift_dist.data.quality.decontam import Decontaminator, load_eval_items

        started = time.perf_counter()
        items = load_eval_items(list(cfg.decontaminate))
        result.counters["decontaminate"] = {"eval_items": len(items)}
        checker = Decontaminator(items, cfg.decontam)
        record(
            [r for r in map(checker.match, _texts(ordered, removed)) if r is not None], "decontam", started
        )
    if cfg.balance.by and (cfg.balance.max_per_group or cfg.balance.weights):
        from ift_dist.data.quality.balance import balance

        started = time.perf_counter()
        clusters = {ref: number for number, cluster in enumerate(result.clusters) for ref in cluster}
        balanced = balance(list(_texts(ordered, removed)), cfg.balance, seed=data.seed, clusters=clusters)
        result.counters["balance"] = balanced.to_json()
        copies = {
            ref: record_copies(weight, data.seed, ref) for ref, weight in balanced.record_weights.items()
        }
        zero = [
            Removal(ref, "balance", None, f"weight {balanced.record_weights[ref]:g} of its group")
            for ref, count in copies.items()
            if count == 0
        ]
        result.copies = {
            (ref.source, ref.index): count for ref, count in copies.items() if count not in (0, 1)
        }
        record([*balanced.removals, *zero], "balance", started)
    return result


def record_copies(weight: float, seed: int, ref: Any) -> int:
    """How many times a record of group weight `weight` is listed: floor(weight), plus one more for a seeded
    `frac(weight)` share of the records (the same ones in every run), so a group weighs `weight` on average, as a
    source weight does; unlike a source weight's fractional part the extra records are not re-drawn every epoch."""
    import hashlib
    import math

    whole = math.floor(weight)
    digest = hashlib.blake2b(f"copies:{seed}:{ref}".encode(), digest_size=8).digest()
    return whole + int(int.from_bytes(digest, "little") / 2**64 < weight - whole)


def _work_file(work: Path | None, name: str) -> Path:
    if work is None:
        raise ValueError(
            f"data.quality.model_score.cache: no file given and no run directory to keep {name} in"
        )
    work.mkdir(parents=True, exist_ok=True)
    return work / name


def quality_dir(output_dir: str | None) -> Path | None:
    """Where data.quality keeps its report and caches (the model-score replies, near-dedup spill files) for a run:
    <output_dir>/quality/, or nowhere without an output_dir."""
    from ift_dist.checkpoint.run_dir import RunDir

    return RunDir(output_dir).quality if output_dir else None


def write_quality_report(result: QualityResult, directory: str | Path) -> Path:
    """directory/quality.json (counts by source and reason, clusters, counters, seconds) and
    directory/removed.jsonl (one Removal per line: ref, reason, matched, detail)."""
    import json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "quality.json").write_text(json.dumps(result.to_json(), indent=1, ensure_ascii=False) + "\n")
    with (directory / "removed.jsonl").open("w", encoding="utf-8") as handle:
        for removal in result.removals:
            handle.write(json.dumps(removal.to_json(), ensure_ascii=False) + "\n")
    return directory / "quality.json"


def scan_training_sources(
    data: DataConfig, *, tokenizer: Any = None, work_dir: str | Path | None = None
) -> list:
    """The training sources scanned and, with data.quality configured, cleaned: rank 0 runs the stages (the model
    score is paid once) and writes work_dir/quality.json and removed.jsonl, every rank applies the same removals."""
    from ift_dist import dist
    from ift_dist.data.scan import scan_sources

    scanned = scan_sources(data.sources, data.on_bad_record)
    if not quality_active(data.quality):
        return scanned
    result = run_quality(scanned, data, tokenizer=tokenizer, work_dir=work_dir) if dist.rank() == 0 else None
    result = dist.broadcast_object(result)
    result.apply(scanned)
    if dist.rank() == 0 and work_dir is not None:
        write_quality_report(result, work_dir)
    counts = result.counts()
    logger.info("data.quality removed %d records: %s", len(result.removals), counts)
    return scanned
