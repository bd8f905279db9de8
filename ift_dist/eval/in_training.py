"""eval.benchmarks scored on the training ranks, under ZeRO-3 and without an export, at train.eval_every and at the
end: the same questions, prompts and scoring as `ift eval mc` on the exported checkpoint of that step."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ift_dist import dist
from ift_dist.checkpoint.run_dir import RunDir
from ift_dist.config import BenchmarkConfig, ConfigError, benchmark_label

logger = logging.getLogger(__name__)


def check_benchmarks(benchmarks: list[BenchmarkConfig]) -> None:
    """Read every benchmark's questions and few-shot examples once, at the start: a missing or damaged file is a
    ConfigError naming the eval.benchmarks entry before training starts, not a crash at the first evaluation."""
    from ift_dist.eval.benchmarks import BenchmarkError, load_questions, load_shots, open_benchmark

    for index, cfg in enumerate(benchmarks):
        try:
            benchmark = open_benchmark(cfg.name, cfg.data_dir)
            questions = load_questions(benchmark, cfg.split, cfg.subjects, cfg.limit)
            for subject in {question.subject for question in questions} if cfg.shots else ():
                load_shots(benchmark, subject, cfg.shots)
        except (BenchmarkError, OSError) as error:
            raise ConfigError(f"eval.benchmarks[{index}] ({cfg.name}): {error}") from error


@contextmanager
def stock_forward(model: Any, backend: str, tokenizer: Any, chat_template: str | None) -> Iterator[None]:
    """The model as `ift eval` loads an export: eval mode, the stock padded attention (training registered its packed
    attention), and the tokenizer carrying the chat template training renders with (the export's)."""
    from ift_dist.attention import enable_packed_attention

    was_training, previous_template = model.training, tokenizer.chat_template
    model.eval()
    model.set_attn_implementation("sdpa")
    tokenizer.chat_template = chat_template or previous_template
    try:
        yield
    finally:
        tokenizer.chat_template = previous_template
        enable_packed_attention(model, backend)
        model.train(was_training)


def score_benchmarks(
    model: Any,
    tokenizer: Any,
    benchmarks: list[BenchmarkConfig],
    *,
    step: int,
    run: RunDir,
    backend: str,
    device: torch.device,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """Every rank: each benchmark scored, its results written by rank 0 to run.eval_results(step, label); returns
    the metrics record {"step", "eval/<label>/acc", ".../acc_macro", [".../acc_norm"], ".../questions",
    ".../seconds"}. Under ZeRO-3 each forward gathers the layers from all ranks, so the ranks score in lockstep."""
    from ift_dist.eval.mc import evaluate_benchmark, write_results

    record: dict[str, Any] = {"step": step}
    with stock_forward(model, backend, tokenizer, chat_template):
        for cfg in benchmarks:
            label = benchmark_label(cfg)
            started = time.perf_counter()
            result = evaluate_benchmark(
                model, tokenizer, cfg, device=device, synced=dist.world_size() > 1, show_progress=False
            )
            seconds = time.perf_counter() - started
            if dist.rank() == 0:
                result.settings["model"] = f"{run.root} step {step} (training ranks, ZeRO-3)"
                write_results(run.eval_results(step, label), result)
            summary = result.summary
            for key in ("acc", "acc_macro", "acc_norm", "questions"):
                if key in summary:
                    record[f"eval/{label}/{key}"] = summary[key]
            record[f"eval/{label}/seconds"] = seconds
    return record
