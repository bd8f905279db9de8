"""answers.jsonl, the file `ift eval generate` writes and `ift eval ifeval` / `ift eval judge` read: where it is, and
reading and appending its records (torch-free, so the judge starts light)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ANSWERS_FILE = "answers.jsonl"


def answers_path(path: str | Path) -> Path:
    """An answers.jsonl, or the one inside an `ift eval generate` output directory."""
    path = Path(path)
    return path / ANSWERS_FILE if path.is_dir() else path


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    """The records of an answers.jsonl ([] when it does not exist). A last line cut short by a crash (no newline,
    not JSON) is left out; any other bad line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: the write was interrupted
                logger.warning("%s:%d: an unfinished last line, left out", path, number)
                continue
            raise ValueError(f"{path}:{number}: not JSON: {error.msg}") from None
    return records


def answered_ids(records: Sequence[dict[str, Any]]) -> set[tuple[str, int]]:
    """The (id, sample) pairs an answers file already holds: generate_answers' done_ids."""
    return {(str(record["id"]), int(record["sample"])) for record in records}


def append_answers(path: str | Path, records: Sequence[Any]) -> None:
    """Appends records to answers.jsonl (rank 0), durably: one write, flushed and fsynced. A line a crash left
    unfinished is cut off first, so the file stays one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as handle:
            data = handle.read()
            if not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)
    lines = [json.dumps(r.to_json() if hasattr(r, "to_json") else r, ensure_ascii=False) for r in records]
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())
