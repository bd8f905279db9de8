"""Every training or eval source opened and scanned once: which records are valid, which are bad and why
(ScannedSource, the unit the loader, the reports and data.quality share)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ift_dist.config import SourceConfig
from ift_dist.data.contracts import BadRecordError


@dataclass
class ScannedSource:
    source: Any  # ift_dist.data.sources.RecordSource
    scan: Any  # ift_dist.data.sources.SourceScan
    weight: float
    # What data.quality removed from this source (ift_dist.data.quality.texts.Removal), already out of
    # scan.valid_indices.
    removals: list = field(default_factory=list)


def scan_sources(configs: Sequence[SourceConfig], on_bad_record: str = "skip") -> list[ScannedSource]:
    """Open and scan every source once. With on_bad_record "error" the first bad record stops here, before
    training. Pass the result to `build_loader(scanned=...)` to build the train and eval loaders from one scan."""
    from ift_dist.data.sources import open_source

    scanned = []
    for config in configs:
        source = open_source(config)
        scan = source.scan()
        if scan.bad and on_bad_record == "error":
            raise BadRecordError(scan.bad[0])
        scanned.append(ScannedSource(source, scan, config.weight))
    return scanned
