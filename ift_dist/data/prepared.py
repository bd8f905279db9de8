"""Reads the rows of `ift data prepare` shards (Parquet) at a stream of plan positions, one row group at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ift_dist.data.contracts import IGNORE_INDEX, DataFileError, RenderedSample, SampleRef
from ift_dist.data.plan import RowGroupPlan

PREPARED_COLUMNS = ("input_ids", "labels", "position_ids", "seq_lens", "sources")

# (epoch, position, the samples of the prepared row at that position)
Item = tuple[int, int, list[RenderedSample]]


class PreparedReader:
    """Rows of `ift data prepare` shards at a stream of positions; one row group decoded at a time."""

    def __init__(self, directory: str | Path, *, seed: int, shuffle: bool):
        import pyarrow.parquet as parquet

        directory = Path(directory)
        if not (directory / "manifest.json").is_file():
            raise DataFileError(
                f"{directory}: no manifest.json; not a directory written by `ift data prepare`"
            )
        files = sorted(directory.glob("shard-*.parquet"))
        if not files:
            raise DataFileError(f"{directory}: no shard-*.parquet files")
        self.groups: list[tuple[Path, int]] = []
        sizes = []
        for path in files:
            metadata = parquet.ParquetFile(path).metadata
            missing = set(PREPARED_COLUMNS) - set(parquet.ParquetFile(path).schema_arrow.names)
            if missing:
                raise DataFileError(f"{path}: missing columns {sorted(missing)}")
            for group in range(metadata.num_row_groups):
                self.groups.append((path, group))
                sizes.append(metadata.row_group(group).num_rows)
        self.plan = RowGroupPlan(sizes, seed=seed, shuffle=shuffle)
        self._current: tuple[int, dict[str, tuple[np.ndarray, Any]]] | None = None

    def _row(self, group: int, row: int) -> list[RenderedSample]:
        if self._current is None or self._current[0] != group:
            import pyarrow.parquet as parquet

            path, local = self.groups[group]
            table = parquet.ParquetFile(path).read_row_group(local, columns=list(PREPARED_COLUMNS))
            columns = {}
            for name in PREPARED_COLUMNS:
                chunk = table.column(name).combine_chunks()  # list<...>: offsets into one flat values array
                values = chunk.values.to_pylist() if name == "sources" else chunk.values.to_numpy()
                columns[name] = (chunk.offsets.to_numpy(), values)
            self._current = (group, columns)
        out = {}
        for name, (offsets, values) in self._current[1].items():
            part = values[offsets[row] : offsets[row + 1]]
            out[name] = list(part) if name == "sources" else part.tolist()
        samples, start = [], 0
        for length, ref in zip(out["seq_lens"], out["sources"], strict=True):
            end = start + length
            if out["position_ids"][start:end] != list(range(length)) or out["labels"][start] != IGNORE_INDEX:
                raise DataFileError(
                    f"{self.groups[group][0]}: a row's positions or labels are not per sample"
                )
            sample = RenderedSample(
                out["input_ids"][start:end], out["labels"][start:end], SampleRef.parse(ref)
            )
            samples.append(sample)
            start = end
        if start != len(out["input_ids"]) or len(out["labels"]) != start:
            raise DataFileError(f"{self.groups[group][0]}: a row's seq_lens do not add up to its length")
        return samples

    def __call__(self, positions: Iterator[tuple[int, int]]) -> Iterator[Item]:
        for epoch, position in positions:
            yield epoch, position, self._row(*self.plan.lookup(epoch, position))
