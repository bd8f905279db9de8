"""Shared fixtures: paths of the read-only shared material and small helpers every test directory uses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from shared_paths import DATA, REPO, SHARED, TOKENIZERS  # noqa: F401  (re-exported for older tests)

# Tests run on 2-core machines: one thread per process keeps multi-process tests from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED.is_dir(), f"../shared not found beside the repository at {SHARED}"
    return SHARED


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct as a float32 HF directory with its tokenizer (tests/smollm2.py); once per session."""
    from smollm2 import write_smollm2_dir

    return write_smollm2_dir(
        tmp_path_factory.mktemp("models") / "smollm2-135m-instruct", TOKENIZERS / "smollm2-135m-instruct"
    )


@pytest.fixture(scope="session")
def served_smollm2(smollm2_dir, tmp_path_factory):
    """(base URL, model name) of one `transformers serve` on SmolLM2-135M-Instruct for the whole session (tests/served.py):
    the judge and the data-generation tests share it instead of each starting their own."""
    from served import transformers_serve

    with transformers_serve(smollm2_dir, tmp_path_factory.mktemp("serve") / "serve.log") as served:
        yield served
