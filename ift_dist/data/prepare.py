"""`ift data prepare`: tokenize and pack a run's training data once into Parquet shards plus manifest.json, which
training then streams (`data.prepared`) so that big corpora are tokenized once and ranks never wait on rendering."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from ift_dist import __version__
from ift_dist.config import Config, to_dict
from ift_dist.data.contracts import PackedRow
from ift_dist.data.report import analyze

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "ift-dist-prepared"
MANIFEST_VERSION = 1


class ShardWriter:
    """Packed rows -> shard-00000.parquet, shard-00001.parquet, ... with int32 list columns and a `sources` column
    ("name:index" of each packed sample). One row group per shard keeps random access to a row cheap."""

    def __init__(self, directory: Path, rows_per_shard: int):
        import pyarrow as pa

        self.directory = directory
        self.rows_per_shard = rows_per_shard
        self.schema = pa.schema(
            [
                ("input_ids", pa.list_(pa.int32())),
                ("labels", pa.list_(pa.int32())),
                ("position_ids", pa.list_(pa.int32())),
                ("seq_lens", pa.list_(pa.int32())),
                ("sources", pa.list_(pa.string())),
            ]
        )
        self.pending: list[PackedRow] = []
        self.shards: list[dict[str, Any]] = []

    def add(self, row: PackedRow) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.rows_per_shard:
            self._write()

    def close(self) -> list[dict[str, Any]]:
        if self.pending:
            self._write()
        return self.shards

    def _write(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows, self.pending = self.pending, []
        table = pa.table(
            {
                "input_ids": [row.input_ids for row in rows],
                "labels": [row.labels for row in rows],
                "position_ids": [row.position_ids for row in rows],
                "seq_lens": [row.seq_lens for row in rows],
                "sources": [[str(ref) for ref in row.refs] for row in rows],
            },
            schema=self.schema,
        )
        name = f"shard-{len(self.shards):05d}.parquet"
        # Written under a temporary name and renamed: a reader never sees half a shard.
        partial = self.directory / (name + ".partial")
        pq.write_table(table, partial, row_group_size=len(rows))
        partial.rename(self.directory / name)
        self.shards.append({"file": name, "rows": len(rows), "tokens": sum(len(row) for row in rows)})


def prepare(
    config: Config, out_dir: str | Path, *, num_proc: int = 1, rows_per_shard: int = 2048
) -> dict[str, Any]:
    """Write the shards and manifest.json into `out_dir` (created; must be empty); returns the manifest."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out directory")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    writer = ShardWriter(out, rows_per_shard)
    report = analyze(config, num_proc=num_proc, on_row=writer.add)
    shards = writer.close()
    seconds = time.perf_counter() - started
    data = dataclasses.replace(config.data, prepared=None)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "ift_dist_version": __version__,
        "tokenizer": config.tokenizer_path,
        "max_length": data.max_length,
        "packing": data.packing,
        "rows": sum(shard["rows"] for shard in shards),
        "tokens": sum(shard["tokens"] for shard in shards),
        "shards": shards,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(report["tokens"]["total"] / max(seconds, 1e-9), 1),
        "report": report,
        "data_config": to_dict(data),
    }
    # The manifest is written last: a directory without one is an unfinished preparation.
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    logger.info(
        "prepared %d rows (%d tokens) in %d shards in %.1f s",
        manifest["rows"],
        manifest["tokens"],
        len(shards),
        seconds,
    )
    return manifest
