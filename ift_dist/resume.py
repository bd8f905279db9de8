"""Resuming a run: the state it continues from besides the engine and the loader (counters, random generators,
train_state.json), the checkpoint it resumes from, the config changes it allows, and restoring every rank.

`find_resume` picks the newest complete checkpoint (checkpoint.verify), warning about each newer one it skips;
`check_config` refuses a resume whose config changes what the run computes; `restore` loads weights, optimizer
states, loader state and generators, through DeepSpeed's universal checkpoint when the world size changed
(`prepare_universal` converts it first). docs/checkpoints.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ift_dist import dist
from ift_dist import engine as engine_lib
from ift_dist.checkpoint import (
    FORMAT,
    TRAIN_STATE,
    UNIVERSAL,
    CheckpointError,
    gather,
    rank_file,
    step_of,
    verify,
    write_atomic,
)
from ift_dist.config import Config, ConfigError, to_dict
from ift_dist.data.loader import merge_states
from ift_dist.optim import learning_rate

logger = logging.getLogger(__name__)


# Config keys a resume may change: they alter how the run is carried out or reported, not what it computes
# (prefix match). Any other changed key is refused unless checkpoint.force_resume is set.
SAFE_TO_CHANGE = (
    "output_dir",
    "tracking.",
    "checkpoint.",
    "export.",
    "train.eval_every",
    "train.eval_batch_rows",
    "train.sample_prompts",
    "train.sample_max_new_tokens",
    "train.max_bad_steps",
    "train.save_at_end",
    "train.micro_batch_rows",  # the global batch stays the same rows; only the accumulation changes
    "train.zero_config",  # ZeRO knobs: sharding, buckets, offload
    "model.attention",  # every backend computes the same attention
    "model.gradient_checkpointing",
    "data.num_workers",
    "data.eval_sources",
)


# ================================================================================================ resumable state


@dataclass
class Progress:
    """The loop's counters that a resumed run continues from."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # real (non-padding) tokens trained on, all ranks
    supervised_tokens: int = 0  # tokens that carried loss, all ranks
    samples: int = 0  # packed samples trained on, all ranks
    bad_in_a_row: int = 0  # non-finite steps in a row, ending at `step`

    def update(self, tokens: int, supervised_tokens: int, samples: int, skipped: bool) -> None:
        """One optimizer step done."""
        self.step += 1
        self.tokens += tokens
        self.supervised_tokens += supervised_tokens
        self.samples += samples
        self.bad_in_a_row = self.bad_in_a_row + 1 if skipped else 0

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, int(state[field.name]))


def rng_state() -> dict[str, Any]:
    """This process's random generators as tensors and numbers (loadable with torch.load(weights_only=True))."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if dist.use_cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss"]))
    saved = state["numpy"]
    keys = saved["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (saved["name"], keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and dist.use_cuda():
        torch.cuda.set_rng_state(state["cuda"])


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    versions = {}
    for package in ("ift-dist", "torch", "deepspeed", "transformers", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def train_state(progress: Progress, cfg: Config, *, epoch: int, wandb_run_id: str | None) -> dict[str, Any]:
    """What train_state.json holds. The LR schedule is a pure function of the step (optim.learning_rate), so the
    step is its whole state; the learning rates are recorded for people reading the file."""
    step = progress.step
    return {
        "format": FORMAT,
        **progress.state_dict(),
        "epoch": epoch,
        "scheduler": {
            "schedule": cfg.train.lr_schedule,
            "last_lr": learning_rate(step - 1, cfg.train) if step > 0 else None,
            "next_lr": learning_rate(step, cfg.train),
        },
        "wandb_run_id": wandb_run_id,
        "world_size": dist.world_size(),
        "config_sha256": config_hash(cfg),
        "config": to_dict(cfg),
        "versions": library_versions(),
        "working_directory": str(Path.cwd()),
        "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


# ================================================================================================ resume


@dataclass(frozen=True)
class Resume:
    """A complete checkpoint to resume from."""

    path: Path
    state: dict[str, Any]  # its train_state.json

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def world_size(self) -> int:
        return int(self.state["world_size"])


def find_resume(setting: str, output_dir: Path, *, checksums: bool = True) -> Resume | None:
    """The checkpoint to resume from (every rank, same answer): checkpoint.resume = "auto" (the newest complete one
    of output_dir/checkpoints, None if there is none), "never" (None) or a path (a step_<N>, checkpoints or run
    directory, whose checkpoint must be complete). Damaged or unfinished checkpoints are skipped with a warning."""
    if setting == "never":
        return None
    explicit = setting != "auto"
    root = Path(setting) if explicit else output_dir / "checkpoints"
    if explicit and (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    # Rank 0 lists and the others take its list: every rank then looks at the same candidates.
    if step_of(root) is not None:
        listed = [root]
    elif root.is_dir():
        steps = [path for path in root.iterdir() if path.is_dir() and step_of(path) is not None]
        listed = sorted(steps, key=step_of, reverse=True)
    else:
        listed = []
    candidates = gather(listed)[0]
    rank, world_size = dist.rank(), dist.world_size()
    for candidate in candidates:
        mine = verify(candidate, checksums=checksums, rank=rank, world_size=world_size)
        problems = sorted({problem for part in gather(mine) for problem in part})
        if not problems:
            state = json.loads((candidate / TRAIN_STATE).read_text())
            logger.info("resuming from %s (step %d, %d ranks)", candidate, state["step"], state["world_size"])
            return Resume(candidate, state)
        if rank == 0:
            logger.warning("skipping checkpoint %s: %s", candidate, "; ".join(problems))
    if explicit:
        raise CheckpointError(
            f"checkpoint.resume={setting}: no complete checkpoint there (see the warnings above)"
        )
    return None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, allowed): the dotted keys whose value differs between two resolved configs (to_dict)."""
    old_flat, new_flat = flatten(old), flatten(new)
    changed = sorted(
        key for key in old_flat.keys() | new_flat.keys() if old_flat.get(key) != new_flat.get(key)
    )
    allowed = [key for key in changed if key.startswith(SAFE_TO_CHANGE)]
    return [key for key in changed if key not in allowed], allowed


def check_config(resume: Resume, cfg: Config) -> None:
    """Refuse a resume whose config changes what the run computes, naming the keys (unless forced)."""
    old, new = resume.state["config"], to_dict(cfg)
    refused, allowed = config_changes(old, new)
    if allowed:
        logger.info("resuming with changed settings: %s", ", ".join(allowed))
    if not refused:
        return
    old_flat, new_flat = flatten(old), flatten(new)
    listing = "; ".join(f"{key}: {old_flat.get(key)!r} -> {new_flat.get(key)!r}" for key in refused)
    if cfg.checkpoint.force_resume:
        logger.warning(
            "resuming from %s with changed settings (checkpoint.force_resume): %s", resume.path, listing
        )
        return
    raise ConfigError(
        f"checkpoint.resume: the config differs from the one of checkpoint {resume.path} in keys that change the "
        f"run: {listing}. Restore them, start a new output_dir, or set checkpoint.force_resume=true"
    )


def prepare_universal(resume: Resume) -> None:
    """Resuming on another number of ranks: rank 0 converts the checkpoint's ZeRO-3 shards into DeepSpeed's
    universal format (step_<N>/universal, once: a finished conversion is kept) while the others wait for it on the
    filesystem, not in a collective: a big model's conversion can outlast the process group's timeout."""
    target, failed = resume.path / UNIVERSAL, resume.path / f"{UNIVERSAL}.error"
    convert = not target.is_dir()
    if dist.rank() == 0 and convert:
        failed.unlink(missing_ok=True)  # of an earlier attempt
    dist.barrier()
    if dist.rank() == 0 and convert:
        logger.info(
            "the checkpoint was written by %d ranks, this run has %d: converting %s to a universal checkpoint",
            resume.world_size,
            dist.world_size(),
            resume.path,
        )
        started = time.perf_counter()
        partial = resume.path / f"{UNIVERSAL}.partial"
        try:
            shutil.rmtree(partial, ignore_errors=True)
            engine_lib.convert_to_universal(resume.path, partial, resume.path / f"{UNIVERSAL}.log")
            os.replace(partial, target)  # a conversion cut short is never taken for a finished one
            logger.info("converted in %.1f s", time.perf_counter() - started)
        except (OSError, RuntimeError) as failure:
            failed.write_text(str(failure))
    while not (target.is_dir() or failed.is_file()):
        time.sleep(1.0)
    if failed.is_file():
        raise CheckpointError(f"no universal checkpoint of {resume.path}: {failed.read_text()}")


def restore(engine: Any, resume: Resume, loader: Any, *, seed: int) -> Progress:
    """Load weights, optimizer states, this rank's loader state and random generators; returns the counters.
    Same world size: each rank takes its own files. Another world size: the universal checkpoint (prepare_universal
    made it), every old rank's loader state merged and re-dealt (merge_states: no sample repeated or skipped), the
    generators of the same rank number or, for a new rank, seeded from (seed, step, rank)."""
    rank, world_size = dist.rank(), dist.world_size()
    same_world = resume.world_size == world_size
    if same_world:
        engine_lib.load_shards(engine, resume.path.parent, resume.path.name, universal=False)
        loader.load_state_dict(_torch_load(rank_file(resume.path, "loader", rank)))
    else:
        engine_lib.load_shards(engine, resume.path, UNIVERSAL, universal=True)
        states = [_torch_load(rank_file(resume.path, "loader", old)) for old in range(resume.world_size)]
        loader.load_state_dict(merge_states(states, world_size)[rank])
    if rank < resume.world_size:
        set_rng_state(_torch_load(rank_file(resume.path, "rng", rank)))
    else:
        digest = hashlib.blake2b(f"{seed}:{resume.step}:{rank}".encode(), digest_size=8).digest()
        dist.seed_everything(int.from_bytes(digest, "little") >> 1)
    progress = Progress()
    progress.load_state_dict(resume.state)
    return progress


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after `step` from metrics.jsonl (rank 0, on resume): the steps a crashed run logged after
    its last checkpoint are trained again, and the file then reads as one uninterrupted run."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.strip() or json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        logger.info("metrics.jsonl: dropped %d records after step %d", len(lines) - len(kept), step)
        write_atomic(path, "".join(kept))
