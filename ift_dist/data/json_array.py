"""Reads JSON array data files: each is parsed whole, and a process keeps the ones it read last."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ift_dist.data.contracts import DataFileError

# Parsed JSON array files per process, least recently read first: a mix reads its sources in turn, and with one
# file held every switch parsed a whole file again (a 2-source mix re-parsed per record). At most 8 files are held.
_json_cache: dict[Path, list] = {}


def cached_paths() -> list[Path]:
    """The files held now, least recently read first."""
    return list(_json_cache)


def clear_cache() -> None:
    _json_cache.clear()


def _load_json_array(path: Path) -> list:
    if path in _json_cache:
        _json_cache[path] = _json_cache.pop(path)  # now the most recent
        return _json_cache[path]
    # surrogateescape keeps non-UTF-8 bytes as lone surrogates; records.py reports them per field.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFileError(
            f"{path}: not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from error
    if not isinstance(records, list):
        raise DataFileError(f"{path}: expected a JSON array of records, got a JSON {type(records).__name__}")
    _json_cache[path] = records
    while len(_json_cache) > 8:
        del _json_cache[next(iter(_json_cache))]
    return records


class JsonArrayFile:
    """A JSON array file: parsed whole, held per process (_load_json_array)."""

    def __init__(self, path: Path):
        self.path = path
        self.count = len(_load_json_array(path))

    def __len__(self) -> int:
        return self.count

    def location(self, local: int) -> str:
        return f"record {local}"

    def read(self, local: int) -> Any:
        return _load_json_array(self.path)[local]

    def iter_records(self) -> Iterator[Any]:
        return iter(_load_json_array(self.path))
