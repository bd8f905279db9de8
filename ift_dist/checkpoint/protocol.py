"""The commit protocol that makes a checkpoint directory count: its files described, its marker and `latest` written
last and atomically, its integrity checked against the marker, and its deletion marker first.

Save: every rank writes and fsyncs its files; the ranks agree that all succeeded; only then rank 0 writes the marker
(temporary file, fsync, rename) and after it moves `latest`. A crash at any point leaves the previous checkpoint
complete and `latest`. `verify` says what is wrong with a checkpoint: no marker, a file missing, truncated (size)
or corrupted (SHA-256). Deletion (retention, a failed save) removes the marker first, so a deletion cut short never
leaves a complete-looking directory. docs/checkpoints.md.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ift_dist.checkpoint.atomic import fsync_path, sha256_of, write_atomic
from ift_dist.checkpoint.run_dir import BEST, LATEST, MARKER, step_of

logger = logging.getLogger(__name__)

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved (on some rank) or the one asked for cannot be resumed."""


def is_complete(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def describe_files(directory: Path, paths: list[Path], checksums: bool) -> dict[str, dict[str, Any]]:
    """{path relative to directory: {size, sha256}} of files this rank wrote, each flushed to disk first."""
    entries = {}
    for path in paths:
        fsync_path(path)
        entry: dict[str, Any] = {"size": path.stat().st_size}
        if checksums:
            entry["sha256"] = sha256_of(path)
        entries[path.relative_to(directory).as_posix()] = entry
    return entries


def remove_checkpoint(directory: Path) -> None:
    """Delete a checkpoint directory, its marker first: a deletion cut short never leaves a complete-looking one."""
    (directory / MARKER).unlink(missing_ok=True)
    if directory.exists():
        fsync_path(directory)
        shutil.rmtree(directory)


def commit(directory: Path, files: dict[str, dict[str, Any]], state: dict[str, Any], checksums: bool) -> None:
    """Rank 0, once every rank's files are on disk: the marker, then `latest`."""
    unlisted = [
        path
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.relative_to(directory).as_posix() not in files
    ]
    if unlisted:  # written by DeepSpeed under a name shard_files does not know: cover them too
        logger.debug("checkpoint files not reported by any rank: %s", unlisted)
        files.update(describe_files(directory, unlisted, checksums))
    for folder in [directory, *(path for path in directory.rglob("*") if path.is_dir())]:
        fsync_path(folder)
    marker = {
        "format": FORMAT,
        "step": state["step"],
        "world_size": state["world_size"],
        "files": dict(sorted(files.items())),
    }
    write_atomic(directory / MARKER, json.dumps(marker, indent=1) + "\n")
    write_atomic(directory.parent / LATEST, directory.name)


def mark_best(directory: Path) -> None:
    """Rank 0: name a complete checkpoint in `best` beside `latest` (atomically, as `latest`)."""
    if not is_complete(directory):
        raise FileNotFoundError(f"{directory} is not a complete checkpoint")
    write_atomic(directory.parent / BEST, directory.name)


def best_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint `best` names, if there is one and it is complete."""
    try:
        directory = checkpoints / (checkpoints / BEST).read_text().strip()
    except OSError:
        return None
    return directory if step_of(directory) is not None and is_complete(directory) else None


def apply_retention(
    checkpoints: Path, *, keep_last: int, keep_every: int, keep_best: bool = False
) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last` (0 = keep all) except multiples of `keep_every` and,
    with `keep_best`, the one `best` names; and unfinished ones older than the newest complete one (left by a crash).
    Returns what was deleted."""
    directories = sorted(
        (p for p in checkpoints.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of
    )
    complete = [p for p in directories if is_complete(p)]
    if not complete:
        return []
    keep = set(complete[-keep_last:] if keep_last else complete)
    keep |= {p for p in complete if keep_every and step_of(p) % keep_every == 0}
    best = best_checkpoint(checkpoints) if keep_best else None
    keep |= {best} if best is not None else set()
    newest = step_of(complete[-1])
    doomed = [p for p in complete if p not in keep]
    doomed += [p for p in directories if not is_complete(p) and step_of(p) < newest]
    for directory in doomed:
        logger.info("deleting checkpoint %s (retention)", directory)
        remove_checkpoint(directory)
    return doomed


def verify(directory: Path, *, checksums: bool = True, rank: int = 0, world_size: int = 1) -> list[str]:
    """What is wrong with a checkpoint directory ([] = complete and intact). Every rank checks presence and sizes;
    the checksums are shared out, rank r reading files r, r + world_size, ..."""
    marker = directory / MARKER
    if not marker.is_file():
        return [f"no completion marker {MARKER} (its save did not finish)"]
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError) as error:
        return [f"unreadable completion marker {MARKER}: {error}"]
    problems = []
    for index, (name, entry) in enumerate(sorted(files.items())):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (size := path.stat().st_size) != entry["size"]:
            problems.append(
                f"{name} has {size} bytes, the marker says {entry['size']} (truncated or overwritten)"
            )
        elif (
            checksums
            and "sha256" in entry
            and index % world_size == rank
            and sha256_of(path) != entry["sha256"]
        ):
            problems.append(f"{name} does not match its SHA-256 in the marker (corrupted)")
    return problems
