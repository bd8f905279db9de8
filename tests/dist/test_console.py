"""What a person sees while the real 2-rank run starts: rank 0 says what it is doing before the first step, and the
first training sample is a short glance printed once (the shared run of conftest.main_run, no extra run)."""

from __future__ import annotations

import pytest

from ift_dist.train import FIRST_SAMPLE_LINES

pytestmark = [pytest.mark.dist, pytest.mark.slow]

POINTER = "see `ift data preview CONFIG` for whole samples"


def test_rank_zero_says_what_it_does_before_the_first_step(main_run):
    lines = main_run.output.splitlines()
    stages = [
        "loading the tokenizer ",
        "reading the prepared data ",  # main_run trains on prepared shards
        "loading the model ",
        "starting DeepSpeed ZeRO-3 on 2 ranks",
        "generating the answers before training to 1 train.sample_prompts",
        "first training sample:",
    ]
    found = [[number for number, line in enumerate(lines) if stage in line] for stage in stages]
    assert all(len(numbers) == 1 for numbers in found), dict(zip(stages, found, strict=True))
    assert [numbers[0] for numbers in found] == sorted(numbers[0] for numbers in found)
    assert all(lines[numbers[0]].startswith("[rank 0] INFO ") for numbers in found[:-1])  # rank 0 only


def test_the_first_training_sample_is_a_short_glance_printed_once(main_run):
    output = main_run.output
    assert output.count("first training sample:") == 1 and output.count(POINTER) == 1
    glance = output[output.index("first training sample:") : output.index(POINTER)]
    assert (
        glance.count("\n") <= FIRST_SAMPLE_LINES + 3
    )  # title, header, at most 8 lines, "... more characters"
