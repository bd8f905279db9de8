"""Fixtures of the multi-rank tests: a tiny random Llama, prepared (packed) shards of real data, and the shared
end-to-end run several tests look at (dist_helpers.launch runs the real `deepspeed` command)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dist_helpers import REPO, TINY_CONFIG, Run, check, launch
from tiny_model import save_tiny_llama


@pytest.fixture(scope="session")
def dist_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="session")
def tiny_model(dist_dir) -> Path:
    return save_tiny_llama(dist_dir / "tiny-llama")


@pytest.fixture(scope="session")
def prepared_data(dist_dir) -> Path:
    """The tiny config's training data, rendered and packed once (`ift data prepare`): every world size then reads
    the same packed rows, rank r taking rows r, r + W, ... so a global batch is the same set of rows."""
    from ift_dist.config import load_config
    from ift_dist.data.prepare import prepare

    cwd = Path.cwd()
    os.chdir(REPO)  # the config's data paths are relative to the repository root
    try:
        prepare(load_config(TINY_CONFIG), dist_dir / "prepared", rows_per_shard=16)
    finally:
        os.chdir(cwd)
    return dist_dir / "prepared"


@pytest.fixture(scope="session")
def parity_overrides(tiny_model, prepared_data) -> list[str]:
    """Shared by the runs compared with each other: prepared packed rows, 3 steps, clipping that bites."""
    return [
        f"model.name_or_path={tiny_model}",
        f"data.prepared={prepared_data}",
        "train.max_steps=3",
        "train.max_grad_norm=0.5",
        "train.weight_decay=0.1",
    ]


@pytest.fixture(scope="session")
def main_run(dist_dir, parity_overrides) -> Run:
    """The real `deepspeed` command end to end on 2 CPU ranks, 2 accumulation steps, fused loss, eval every 2 steps,
    W&B offline, sample prompts, checkpoint at the end: the run several tests look at."""
    overrides = [*parity_overrides, "train.loss=fused", "tracking.wandb.mode=offline", "train.eval_every=2"]
    return check(launch(dist_dir / "main", overrides))
