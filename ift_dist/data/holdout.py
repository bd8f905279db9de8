"""Writes the test split (data.test_fraction) of every training source to JSONL files for evaluation after training.

Which records form the test split is the plan's decision (`plan.held_for_test`: the top of the seeded hash whose
bottom is the eval split), taken from each source's valid records after data.quality, so the records written here are
exactly those the training and eval loaders leave out. Each is written as its file holds it (the parsed row, one JSON
object per line), so any tool that reads the source's format reads the test file too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from ift_dist.config import DataConfig
from ift_dist.data.contracts import BadRecord
from ift_dist.data.plan import PlanSource, split_off_test
from ift_dist.data.scan import ScannedSource

logger = logging.getLogger(__name__)


def write_test_split(data: DataConfig, scanned: Sequence[ScannedSource], directory: Path) -> dict[str, int]:
    """<directory>/<source>.jsonl for every training source (rank 0): its test records in index order. Returns
    {source name: records written}; nothing is written when data.test_fraction is 0."""
    if data.test_fraction <= 0:
        return {}
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for item in scanned:
        source = PlanSource(item.scan.name, item.scan.valid_indices, item.weight)
        _, test = split_off_test(source, data.test_fraction, data.seed)
        path = directory / f"{item.scan.name}.jsonl"
        temporary = path.with_name(f".{path.name}.tmp")
        with temporary.open("w", encoding="utf-8") as handle:
            for index in test.valid_indices.tolist():
                row = item.source.raw(index)
                if isinstance(row, BadRecord):  # valid at the scan: the file changed since
                    raise RuntimeError(f"{item.scan.name}: record {index} is no longer readable: {row}")
                handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        temporary.replace(path)
        counts[item.scan.name] = len(test.valid_indices)
    logger.info(
        "data.test_fraction=%g: %s test records held out of training and evaluation, written to %s",
        data.test_fraction, ", ".join(f"{name} {count}" for name, count in counts.items()), directory,
    )  # fmt: skip
    return counts
