"""The eval section: eval.benchmarks entries are typed and checked at load time, and a benchmark whose files are
missing or damaged stops training before it starts, naming the entry."""

from __future__ import annotations

import pytest

from ift_dist.config import BenchmarkConfig, ConfigError, McScoring, PromptFormat, load_config
from ift_dist.eval.in_training import check_benchmarks

CONFIG = "configs/tiny_cpu.yaml"


def test_benchmarks_load_typed(monkeypatch):
    monkeypatch.chdir(__import__("conftest").REPO)
    cfg = load_config(
        CONFIG,
        [
            "eval.benchmarks=[{name: mmlu, subjects: [anatomy], limit: 5, shots: 2, scoring: option_text, format: chat}]"
        ],
    )
    (benchmark,) = cfg.eval.benchmarks
    assert benchmark.scoring is McScoring.option_text and benchmark.format is PromptFormat.chat
    assert (benchmark.subjects, benchmark.limit, benchmark.shots) == (["anatomy"], 5, 2)
    assert cfg.eval.at_start is False


@pytest.mark.parametrize(
    "entry, message",
    [
        ("{name: mmlu, shots: 6}", r"eval\.benchmarks\[0\]\.shots"),
        ("{name: mmlu, scoring: logits}", r"scoring: 'logits' is not one of letter, option_text"),
        ("{name: mmlu, limit: -1}", r"eval\.benchmarks\[0\]\.limit"),
        ("{name: mmlu, batch_size: 0}", r"eval\.benchmarks\[0\]\.batch_size"),
        ("{name: mmlu}, {name: mmlu}", r"eval\.benchmarks\[1\]\.name: 'mmlu' is listed twice"),
        ("{nmae: mmlu}", r"nmae"),
    ],
)
def test_bad_entries_name_the_key(monkeypatch, entry, message):
    monkeypatch.chdir(__import__("conftest").REPO)
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [f"eval.benchmarks=[{entry}]"])


def test_missing_benchmark_files_stop_before_training(tmp_path):
    check_benchmarks(
        [BenchmarkConfig(name="mmlu", subjects=["anatomy"], limit=2, shots=1)]
    )  # the shared copy
    with pytest.raises(ConfigError, match=r"eval\.benchmarks\[0\] \(mmlu\)"):
        check_benchmarks([BenchmarkConfig(name="mmlu", data_dir=str(tmp_path))])
    with pytest.raises(ConfigError, match=r"eval\.benchmarks\[1\].*no_such_subject"):
        check_benchmarks(
            [
                BenchmarkConfig(name="ceval", limit=1),
                BenchmarkConfig(name="mmlu", subjects=["no_such_subject"]),
            ]
        )
