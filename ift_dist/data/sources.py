"""Opens a data source (file, glob, directory or `save_to_disk` directory) as lazily read, indexed records.

Nothing needs the whole corpus in memory, except JSON array files:
- JSONL (.jsonl, .ndjson, or a .json file holding JSON lines): a numpy index of byte offsets; `get` reads one line
  with `os.pread` (no shared file position, so a descriptor inherited by a forked worker stays correct).
- Parquet: a row-group index; `get` reads one row group at a time and keeps the current one per process.
- A `datasets.Dataset.save_to_disk` directory: memory-mapped Arrow through `datasets.load_from_disk`.
- A JSON array (.json starting with "[") has to be parsed whole: each process keeps the 8 it read last
  (json_array.py). Big corpora should be JSONL or Parquet, or prepared once with `ift data prepare`.

Record indices run across the files in sorted order. Blank JSONL lines are not records. Locations: "line N"
(JSONL, 1-based as editors count), "record N" (JSON array, 0-based element index), "row N" (Parquet/Arrow,
0-based within the file). Parquet/Arrow rows lose their None values (a schema union fills them in; missing
fields, really). A file that cannot be read at all raises DataFileError when the source is opened.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from ift_dist.config import RecordFormat, SourceConfig, relative_path_note
from ift_dist.data.contracts import BadRecord, DataFileError, SampleRef, ValidRecord
from ift_dist.data.json_array import JsonArrayFile
from ift_dist.data.records import FILTERED, FORMATS, convert_record, detect_format

logger = logging.getLogger(__name__)

SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_BOM = b"\xef\xbb\xbf"


@dataclass
class SourceScan:
    """What one streaming pass over a source found."""

    name: str
    num_records: int
    valid_indices: np.ndarray  # int64, ascending: records that became a Conversation (or TextDocument)
    bad: list[BadRecord] = field(default_factory=list)
    bad_counts: dict[str, int] = field(default_factory=dict)  # reason -> records
    filtered: int = 0  # records left out by `where` (not bad)
    trimmed_trailing_turns: int = 0  # messages after the last assistant reply, removed
    formats: dict[str, str] = field(default_factory=dict)  # file -> record format


def _drop_none(value: Any) -> Any:
    """Arrow rows: None from a schema union means the field is missing."""
    if isinstance(value, dict):
        return {key: _drop_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_drop_none(item) for item in value]
    return value


def _without_handles(state: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """A reader's pickled state: file handles are opened lazily in each process, never shipped."""
    return {key: None if key in names else value for key, value in state.items()}


class _JsonLinesFile:
    """A JSON-lines file: a byte-offset index built once, one `os.pread` per record."""

    def __init__(self, path: Path):
        self.path = path
        offsets, line_numbers, position = [], [], 0
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip() and line.strip() != _BOM:
                    offsets.append(position)
                    line_numbers.append(number)
                position += len(line)
        self.size = position
        self.offsets = np.asarray(offsets, dtype=np.int64)
        # Line numbers are only kept when blank lines make them differ from index + 1.
        blank = bool(line_numbers) and line_numbers[-1] != len(line_numbers)
        self.line_numbers = np.asarray(line_numbers, dtype=np.int64) if blank else None
        self._fd: int | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return _without_handles(self.__dict__, ("_fd", "_pid"))

    def __len__(self) -> int:
        return len(self.offsets)

    def location(self, local: int) -> str:
        return f"line {int(self.line_numbers[local]) if self.line_numbers is not None else local + 1}"

    def _line(self, local: int) -> tuple[bytes, int]:
        """The record's line without its newline, and the file offset of its first byte."""
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start = int(self.offsets[local])
        end = int(self.offsets[local + 1]) if local + 1 < len(self.offsets) else self.size
        data = os.pread(self._fd, end - start, start).split(b"\n", 1)[0]
        if start == 0 and data.startswith(_BOM):
            return data[len(_BOM) :], len(_BOM)
        return data, start

    def read(self, local: int) -> Any:
        data, start = self._line(local)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            detail = f"invalid UTF-8 at byte offset {start + error.start} of the file"
            return BadRecord("non_utf8", str(self.path), self.location(local), None, detail)
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            detail = f"not valid JSON: {error.msg} at column {error.colno}"
            return BadRecord("invalid_json", str(self.path), self.location(local), None, detail)

    def iter_records(self) -> Iterator[Any]:
        return (self.read(local) for local in range(len(self)))


class _ParquetFile:
    """A Parquet file: a row-group index; the row group last read is kept per process."""

    def __init__(self, path: Path):
        self.path = path
        self._file = self._group = self._pid = None
        metadata = self._open().metadata
        counts = [metadata.row_group(index).num_rows for index in range(metadata.num_row_groups)]
        self.group_starts = np.cumsum([0, *counts], dtype=np.int64)

    def _open(self) -> Any:
        import pyarrow.parquet as parquet

        if self._file is None or self._pid != os.getpid():
            try:
                self._file, self._pid, self._group = parquet.ParquetFile(self.path), os.getpid(), None
            except Exception as error:  # pyarrow raises ArrowInvalid / OSError for a corrupt file
                raise DataFileError(f"{self.path}: not a readable Parquet file: {error}") from error
        return self._file

    def _read_group(self, group: int) -> Any:
        try:
            return self._open().read_row_group(group)
        except DataFileError:
            raise
        except Exception as error:
            raise DataFileError(f"{self.path}: cannot read row group {group}: {error}") from error

    def __getstate__(self) -> dict[str, Any]:
        return _without_handles(self.__dict__, ("_file", "_pid", "_group"))

    def __len__(self) -> int:
        return int(self.group_starts[-1])

    def location(self, local: int) -> str:
        return f"row {local}"

    def read(self, local: int) -> Any:
        group = int(np.searchsorted(self.group_starts, local, side="right")) - 1
        if self._group is None or self._group[0] != group or self._pid != os.getpid():
            table = self._read_group(group)
            self._group = (group, table)
        row = self._group[1].slice(local - int(self.group_starts[group]), 1).to_pylist()[0]
        return _drop_none(row)

    def iter_records(self) -> Iterator[Any]:
        for group in range(len(self.group_starts) - 1):
            for batch in self._read_group(group).to_batches(max_chunksize=1024):
                yield from (_drop_none(row) for row in batch.to_pylist())


class _ArrowDataset:
    """A `datasets.Dataset.save_to_disk` directory, memory-mapped by `datasets.load_from_disk`."""

    def __init__(self, path: Path):
        self.path = path
        self._dataset = self._pid = None
        self.count = len(self._open())

    def _open(self) -> Any:
        if self._dataset is None or self._pid != os.getpid():
            import datasets

            try:
                dataset = datasets.load_from_disk(str(self.path))
            except Exception as error:
                raise DataFileError(f"{self.path}: not a readable save_to_disk directory: {error}") from error
            if not isinstance(dataset, datasets.Dataset):
                raise DataFileError(f"{self.path}: holds a DatasetDict; point path at one split's directory")
            self._dataset, self._pid = dataset, os.getpid()
        return self._dataset

    def __getstate__(self) -> dict[str, Any]:
        return _without_handles(self.__dict__, ("_dataset", "_pid"))

    def __len__(self) -> int:
        return self.count

    def location(self, local: int) -> str:
        return f"row {local}"

    def read(self, local: int) -> Any:
        return _drop_none(self._open()[local])

    def iter_records(self) -> Iterator[Any]:
        for batch in self._open().iter(batch_size=1024):
            columns = list(batch)
            for values in zip(*(batch[column] for column in columns)):
                yield _drop_none(dict(zip(columns, values)))


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _holds_json_lines(path: Path) -> bool:
    """Whether a .json file holds JSON lines rather than one JSON array (an empty file holds no lines)."""
    with path.open("rb") as handle:
        head = handle.read(1 << 16).removeprefix(_BOM).lstrip()
    if not head.startswith(b"{"):
        return not head
    try:
        json.loads(head.split(b"\n", 1)[0])
        return True
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    # Not one object per line. One object spread over several lines is not a list of records; anything else is
    # JSON lines with a broken first line, reported as a bad record.
    try:
        whole = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True
    if isinstance(whole, dict):
        raise DataFileError(f"{path}: holds one JSON object; expected an array of records or JSON lines")
    return True


def _open_file(path: Path) -> Any:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataFileError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
    if kind == "parquet":
        return _ParquetFile(path)
    if kind == "json" and not _holds_json_lines(path):
        return JsonArrayFile(path)
    return _JsonLinesFile(path)


def _resolve(path_text: str) -> tuple[list[Path], str]:
    """The files (or one save_to_disk directory) a source path names, sorted, and the default source name."""
    path = Path(path_text).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return [path], path.name
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        files = [p for p in files if not p.name.startswith(".")]
        if not files:
            raise DataFileError(f"{path}: directory holds no {', '.join(SUFFIXES)} files")
        return files, path.name
    if path.is_file():
        return [path], path.stem
    if any(character in path_text for character in "*?["):
        matches = [Path(match) for match in sorted(glob.glob(str(path), recursive=True))]
        files = [match for match in matches if match.is_file() and match.suffix.lower() in SUFFIXES]
        if not files:
            raise DataFileError(
                f"{path}: the glob matches no {', '.join(SUFFIXES)} files{relative_path_note(path_text)}"
            )
        if len(files) == 1:
            return files, files[0].stem
        # Several files: named after the deepest directory of the pattern without glob characters.
        fixed = []
        for part in path.parts:
            if any(character in part for character in "*?["):
                break
            fixed.append(part)
        return files, (fixed[-1] if fixed else "") or "data"
    raise DataFileError(f"{path}: no such file or directory{relative_path_note(path_text)}")


class RecordSource:
    """The records of one source, read lazily by index. Picklable: file handles are reopened in each process."""

    def __init__(self, config: SourceConfig, name: str, files: list[Any], formats: list[str | None]):
        self.config = config
        self.name = name
        self._files = files
        self._formats = formats
        self._starts = np.cumsum([0, *(len(file) for file in files)], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return f"RecordSource({self.name!r}, {len(self._files)} files, {len(self)} records)"

    @property
    def files(self) -> list[str]:
        return [str(file.path) for file in self._files]

    @property
    def formats(self) -> dict[str, str]:
        return {
            str(f.path): fmt for f, fmt in zip(self._files, self._formats, strict=True) if fmt is not None
        }

    def get(self, index: int) -> ValidRecord | BadRecord:
        """Record `index` (across files, bad records included) as a valid record, or why it is not one."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: record {index} out of range (0..{len(self) - 1})")
        number = int(np.searchsorted(self._starts, index, side="right")) - 1
        local = index - int(self._starts[number])
        return self._convert(number, local, index, self._files[number].read(local))[0]

    def raw(self, index: int) -> Any:  # the row as its file holds it (not converted), or a BadRecord
        number = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._files[number].read(index - int(self._starts[number]))

    def _convert(self, number: int, local: int, index: int, raw: Any) -> tuple[ValidRecord | BadRecord, int]:
        if isinstance(raw, BadRecord):
            return raw, 0
        file = self._files[number]
        return convert_record(
            raw,
            fmt=self._formats[number],
            source=self.config,
            ref=SampleRef(self.name, index),
            file=str(file.path),
            location=file.location(local),
        )

    def __iter__(self) -> Iterator[ValidRecord | BadRecord]:
        for result, _ in self._iter_converted():
            yield result

    def _iter_converted(self) -> Iterator[tuple[ValidRecord | BadRecord, int]]:
        index = 0
        for number, file in enumerate(self._files):
            for local, raw in enumerate(file.iter_records()):
                yield self._convert(number, local, index, raw)
                index += 1

    def scan(self) -> SourceScan:
        """One streaming pass over every record: which are valid, which are bad and why."""
        valid, bad, filtered, trimmed = [], [], 0, 0
        for index, (result, trimmed_here) in enumerate(self._iter_converted()):
            if isinstance(result, ValidRecord):
                valid.append(index)
                trimmed += trimmed_here
            elif result.reason == FILTERED:
                filtered += 1
            else:
                bad.append(result)
        counts = dict(Counter(record.reason for record in bad).most_common())
        scan = SourceScan(
            name=self.name,
            num_records=len(self),
            valid_indices=np.asarray(valid, dtype=np.int64),
            bad=bad,
            bad_counts=counts,
            filtered=filtered,
            trimmed_trailing_turns=trimmed,
            formats=self.formats,
        )
        logger.info(
            "source %s: %d records, %d valid, %d bad%s, %d filtered, %d trailing turns trimmed",
            self.name, len(self), len(valid), len(bad), f" {counts}" if counts else "", filtered, trimmed,
        )  # fmt: skip
        return scan


def _detect_file_format(file: Any, config: SourceConfig) -> str | None:
    """The configured format, or the one the file's first JSON object shows; None for a file without records."""
    if config.format != RecordFormat.auto:
        return str(config.format)
    for raw in islice(file.iter_records(), 100_000):
        if isinstance(raw, dict):
            fmt = detect_format(raw, config.columns)
            if fmt is None:
                raise DataFileError(
                    f"{file.path}: cannot tell the record format from the keys of its first record "
                    f"({', '.join(map(str, raw)) or 'none'}); set format: to one of {', '.join(FORMATS)}"
                )
            return fmt
    if len(file):
        raise DataFileError(f"{file.path}: no JSON object among its first records; cannot tell the format")
    return None


def open_source(config: SourceConfig) -> RecordSource:
    """Resolve the files of a source, index them and detect their formats; DataFileError if any is unreadable."""
    try:
        paths, default_name = _resolve(config.path)
        files = [_ArrowDataset(path) if path.is_dir() else _open_file(path) for path in paths]
        formats = [_detect_file_format(file, config) for file in files]
    except OSError as error:
        where = error.filename or config.path
        raise DataFileError(f"{where}: cannot read: {error.strerror or error}") from error
    source = RecordSource(config, config.name or default_name, files, formats)
    if len(source) == 0:
        raise DataFileError(f"{config.path}: holds no records")
    return source
