"""The eval section of the run config: the multiple-choice benchmarks scored during training (docs/eval.md).

`ift eval mc` takes the same fields as command-line options (BenchmarkConfig is the one definition of both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ift_dist.config.checks import ConfigError, check_choices, check_positive
from ift_dist.config.choices import McScoring, PromptFormat

# The benchmarks known by name; anything else is a directory in the layout of one of them (docs/eval.md).
BENCHMARK_NAMES = ("mmlu", "ceval", "cmmlu")


@dataclass
class BenchmarkConfig:
    """One multiple-choice benchmark: which questions, how they are prompted and scored."""

    # mmlu, ceval, cmmlu (found under `data_dir`) or a directory with the CSV layout of one of them.
    name: str = "mmlu"
    # Where mmlu/, ceval/ and cmmlu/ are; "" = $IFT_EVAL_DATA, else ../shared/data/eval. Nothing is downloaded.
    data_dir: str = ""
    # The split scored: "" = the benchmark's evaluation split (test for MMLU and CMMLU, val for C-Eval).
    split: str = ""
    # Subjects to score (file stems such as abstract_algebra); empty = all.
    subjects: list[str] = field(default_factory=list)
    # The first N questions of each subject (lm-eval's --limit per subject task); 0 = all.
    limit: int = 0
    # Few-shot examples from the dev split (the first N of the subject, as lm-eval's first_n sampler), 0..5.
    shots: int = 0
    # letter or option_text (McScoring).
    scoring: McScoring = McScoring.letter
    # plain (lm-eval's text prompt) or chat (the model's chat template).
    format: PromptFormat = PromptFormat.plain
    # Sequences per forward pass.
    batch_size: int = 8

    def validate(self, key: str) -> None:
        check_choices(self, key)
        if not self.name:
            raise ConfigError(f"{key}.name: one of {', '.join(BENCHMARK_NAMES)} or a benchmark directory")
        if not 0 <= self.shots <= 5:
            raise ConfigError(
                f"{key}.shots: 0..5 (the dev split has 5 examples per subject), got {self.shots}"
            )
        check_positive(f"{key}.limit", self.limit, allow_zero=True)
        check_positive(f"{key}.batch_size", self.batch_size)


@dataclass
class EvalConfig:
    """Benchmarks scored on the training ranks under ZeRO-3 (no export) at train.eval_every and at the end; results
    go to metrics.jsonl and W&B as eval/<name>/acc and to <output_dir>/eval/step_<N>/<name>/."""

    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    # Also score them before the first step of a fresh run (the "before" of before/after).
    at_start: bool = False

    def validate(self, key: str) -> None:
        names = set()
        for index, benchmark in enumerate(self.benchmarks):
            benchmark.validate(f"{key}.benchmarks[{index}]")
            label = benchmark_label(benchmark)
            if label in names:
                raise ConfigError(f"{key}.benchmarks[{index}].name: {label!r} is listed twice")
            names.add(label)


def benchmark_label(benchmark: BenchmarkConfig) -> str:
    """The name results are logged under: the benchmark name, or a directory's last component."""
    return benchmark.name.rstrip("/").split("/")[-1]
