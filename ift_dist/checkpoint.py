"""Checkpoints on disk: the <output_dir>/checkpoints/step_<N>/ layout, the crash-safe save of every rank's files, the
`latest` pointer, retention and verification. (Choosing one and restoring from it: ift_dist/resume.py.)

    checkpoints/
      latest                    "step_<N>", the newest complete checkpoint; moved by an atomic rename
      step_<N>/
        zero_pp_rank_<r>_mp_rank_00_model_states.pt    DeepSpeed ZeRO-3 shards of rank r: model states ...
        zero_pp_rank_<r>_mp_rank_00_optim_states.pt    ... and fp32 master weights + AdamW moments
        loader_rank_<r>.pt      rank r's data loader state (plan cursor, packer buffer, counters)
        rng_rank_<r>.pt         rank r's random generators (Python, NumPy, torch, CUDA)
        train_state.json        step, epoch, tokens seen, LR schedule, W&B run id, world size, config + hash, versions
        model_files/            config.json, generation_config.json, the tokenizer with its chat template (export)
        complete.json           the completion marker: every file above with its size and SHA-256, written last
        universal/              made when a run resumes on another world size (DeepSpeed's universal checkpoint)

Save: every rank writes and fsyncs its files; the ranks agree that all succeeded; only then rank 0 writes the marker
(temporary file, fsync, rename) and after it moves `latest`. A crash at any point leaves the previous checkpoint
complete and `latest`. `verify` says what is wrong with a checkpoint: no marker, a file missing, truncated (size)
or corrupted (SHA-256). docs/checkpoints.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from ift_dist import dist
from ift_dist import engine as engine_lib

logger = logging.getLogger(__name__)

MARKER = "complete.json"
LATEST = "latest"
TRAIN_STATE = "train_state.json"
MODEL_FILES = "model_files"
UNIVERSAL = "universal"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved (on some rank) or the one asked for cannot be resumed."""


def step_of(path: Path) -> int | None:
    """N of a step_<N> directory name, else None."""
    prefix, _, number = path.name.partition("_")
    return int(number) if prefix == "step" and number.isdigit() else None


def is_complete(directory: Path) -> bool:
    return (directory / MARKER).is_file()


# ================================================================================================ files


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write text to a temporary file, flush it to disk, rename it over `path`, flush the directory: readers see the
    old file or the new one, never a part."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_path(path.parent)


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


# ================================================================================================ save


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not (dist.is_initialized() and dist.world_size() > 1):
        return [value]
    values: list[Any] = [None] * dist.world_size()
    torch_dist.all_gather_object(values, value)
    return values


def _agree(error: str | None) -> list[str]:
    """Every rank's error (None = fine) of one stage of a save, on every rank."""
    return [f"rank {rank}: {text}" for rank, text in enumerate(gather(error)) if text is not None]


def save(
    engine: Any,
    checkpoints: Path,
    *,
    state: dict[str, Any],
    rank_state: dict[str, Any],
    model_files: Path | None = None,
    checksums: bool = True,
    keep_last: int = 0,
    keep_every: int = 0,
) -> Path:
    """Save checkpoints/step_<N> (N = state["step"]): every rank's ZeRO-3 shards and its `rank_state` entries
    (name -> object, written as <name>_rank_<r>.pt: the loader and RNG states), rank 0's train_state.json (`state`)
    and a copy of `model_files`; then the marker, then `latest`, then retention. Every rank must call it. Raises
    CheckpointError on every rank if any rank failed; the unfinished directory is then removed, every other
    checkpoint is left as it was."""
    rank = dist.rank()
    directory = checkpoints / f"step_{state['step']}"
    error = None
    if rank == 0:
        try:  # leftovers of an unfinished save of this step (a crash, then a resume from an older checkpoint)
            remove_checkpoint(directory)
            directory.mkdir(parents=True)
        except OSError as failure:
            error = f"cannot create {directory}: {failure}"
    _raise_if_failed(_agree(error), directory)

    entries: dict[str, dict[str, Any]] = {}
    error = None
    try:
        with _test_fault("disk_full", state["step"], rank):
            written = engine_lib.save_shards(engine, checkpoints, directory.name)
        for name, value in rank_state.items():
            written.append(_torch_save(value, rank_file(directory, name, rank)))
        if rank == 0:
            (directory / TRAIN_STATE).write_text(json.dumps(state, indent=1, default=str) + "\n")
            written.append(directory / TRAIN_STATE)
            if model_files is not None:
                shutil.copytree(model_files, directory / MODEL_FILES)
                written += sorted(path for path in (directory / MODEL_FILES).rglob("*") if path.is_file())
        entries = describe_files(directory, written, checksums)
        _test_fault("sigterm", state["step"], rank)
        _test_fault("sigkill", state["step"], rank)
    except (OSError, RuntimeError) as failure:
        error = f"{type(failure).__name__}: {failure}"
    _raise_if_failed(_agree(error), directory)

    error = None
    files = {name: entry for part in gather(entries) for name, entry in part.items()}
    if rank == 0:
        try:
            commit(directory, files, state, checksums)
        except OSError as failure:
            error = f"{type(failure).__name__}: {failure}"
    _raise_if_failed(_agree(error), directory)
    if rank == 0:
        try:
            apply_retention(checkpoints, keep_last=keep_last, keep_every=keep_every)
        except OSError as failure:  # the new checkpoint is complete: a failed deletion does not undo it
            logger.warning("retention: could not delete an old checkpoint: %s", failure)
    return directory


def rank_file(directory: Path, name: str, rank: int) -> Path:
    return directory / f"{name}_rank_{rank:05d}.pt"


def _torch_save(value: Any, path: Path) -> Path:
    torch.save(value, path)
    return path


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


def _raise_if_failed(errors: list[str], directory: Path) -> None:
    if not errors:
        return
    if dist.rank() == 0:
        try:
            remove_checkpoint(directory)
        except OSError as failure:
            logger.warning("could not remove the failed checkpoint %s: %s", directory, failure)
    dist.barrier()
    raise CheckpointError(
        f"saving checkpoint {directory} failed ({'; '.join(errors)}); the previous checkpoints are untouched"
    )


def apply_retention(checkpoints: Path, *, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last` (0 = keep all) except multiples of `keep_every`,
    and unfinished ones older than the newest complete one (left by a crash). Returns what was deleted."""
    directories = sorted(
        (p for p in checkpoints.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of
    )
    complete = [p for p in directories if is_complete(p)]
    if not complete:
        return []
    keep = set(complete[-keep_last:] if keep_last else complete)
    keep |= {p for p in complete if keep_every and step_of(p) % keep_every == 0}
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


# ================================================================================================ test faults

# IFT_TEST_FAULT=KIND:STEP:RANK[,...] (STEP or RANK may be *) makes the save of that step fail on that rank, at the
# process edge, for the fault tests (tests/dist/test_checkpoint_faults.py). Never set it otherwise.
#   disk_full  the OS refuses the rank's DeepSpeed shard writes (file size limit), as on a full disk
#   sigterm    the rank signals itself SIGTERM after writing its files: a second stop signal during a save
#   sigkill    the rank kills itself after writing its files, before the marker: a crash in the middle of a save
FAULT_VARIABLE = "IFT_TEST_FAULT"


def _fault_wanted(kind: str, step: int, rank: int) -> bool:
    for item in filter(None, os.environ.get(FAULT_VARIABLE, "").split(",")):
        name, fault_step, fault_rank = item.split(":")
        if name == kind and fault_step in ("*", str(step)) and fault_rank in ("*", str(rank)):
            return True
    return False


@contextmanager
def _fault_context(kind: str, step: int, rank: int) -> Iterator[None]:
    if kind != "disk_full" or not _fault_wanted(kind, step, rank):
        yield
        return
    logger.warning("%s: writes over 64 kB fail during this save", FAULT_VARIABLE)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)


def _test_fault(kind: str, step: int, rank: int) -> Any:
    """The fault of `kind` for this save, if IFT_TEST_FAULT asks for it (disk_full: a context manager)."""
    if kind == "disk_full":
        return _fault_context(kind, step, rank)
    if _fault_wanted(kind, step, rank):
        logger.warning("%s: %s in the save of step %d", FAULT_VARIABLE, kind, step)
        os.kill(os.getpid(), signal.SIGKILL if kind == "sigkill" else signal.SIGTERM)
    return None
