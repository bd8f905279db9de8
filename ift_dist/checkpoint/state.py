"""The resumable state of a run besides the engine's shards, as checkpoint components: the loop's counters
(`Progress`, kept in train_state.json with a description of the run) and each rank's random generators and loader.

Every component has `state_dict()` / `load_state_dict()`; a per-rank one also `load_resharded()`, which takes its
state from the files of a checkpoint written by another number of ranks. docs/checkpoints.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ift_dist import dist
from ift_dist.checkpoint.protocol import FORMAT
from ift_dist.config import Config, to_dict
from ift_dist.data.loader import merge_states
from ift_dist.optim import learning_rate


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


def train_state(
    progress: Progress,
    cfg: Config,
    *,
    epoch: int,
    steps: dict[str, Any] | None = None,
    shared: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What train_state.json holds: the counters (what a resume loads) and, for people and config checks, the run
    they belong to. The LR schedule is a pure function of the step and the run's step count (optim.learning_rate),
    so those are its whole state; the learning rates are recorded for people reading the file. `steps`: the step
    count (data.epochs.StepCount.state_dict(), kept so a resumed train.num_epochs run does not count again);
    `shared`: the states of components that are the same on every rank (early stopping), by name."""
    step = progress.step
    total = (steps or {}).get("total")
    return {
        "format": FORMAT,
        **progress.state_dict(),
        "epoch": epoch,
        "scheduler": {
            "schedule": cfg.train.lr_schedule,
            "last_lr": learning_rate(step - 1, cfg.train, total) if step > 0 else None,
            "next_lr": learning_rate(step, cfg.train, total),
        },
        **({"steps": steps} if steps else {}),
        **(shared or {}),
        "world_size": dist.world_size(),
        "config_sha256": config_hash(cfg),
        "config": to_dict(cfg),
        "versions": library_versions(),
        "working_directory": str(Path.cwd()),
        "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


# ================================================================================================ per-rank components


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


class RandomState:
    """This process's random generators (Python, NumPy, torch, CUDA) as a checkpoint component."""

    def __init__(self, seed: int):
        self.seed = seed  # seeds a rank that did not exist when the checkpoint was written

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)

    def load_resharded(self, read: Callable[[int], Any], saved_world_size: int, step: int) -> None:
        """The generators of the same rank number or, for a rank the checkpoint did not have, seeded from
        (seed, step, rank): a fresh but reproducible stream."""
        rank = dist.rank()
        if rank < saved_world_size:
            set_rng_state(read(rank))
            return
        digest = hashlib.blake2b(f"{self.seed}:{step}:{rank}".encode(), digest_size=8).digest()
        dist.seed_everything(int.from_bytes(digest, "little") >> 1)


class LoaderState:
    """A rank's data loader (plan cursor, packer buffer, counters) as a checkpoint component."""

    def __init__(self, loader: Any):
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def load_resharded(self, read: Callable[[int], Any], saved_world_size: int, step: int) -> None:
        """Every old rank's state merged and re-dealt over this world size (merge_states): what no rank had read,
        and what sat in the packers' buffers, is read by the new ranks, so no sample is repeated or skipped."""
        states = [read(old) for old in range(saved_world_size)]
        self.loader.load_state_dict(merge_states(states, dist.world_size())[dist.rank()])


def rank_components(loader: Any, seed: int) -> dict[str, Any]:
    """The per-rank components of a training checkpoint by name; a name is also its file's: <name>_rank_<r>.pt."""
    return {"loader": LoaderState(loader), "rng": RandomState(seed)}
