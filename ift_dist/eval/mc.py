"""A multiple-choice benchmark scored on every rank: each rank scores its share of the questions, the predictions are
gathered back into question order, summarised (micro and macro accuracy by subject and category), written and
printed.

Sharding is round-robin (question i on rank i % world_size), so every rank gets the same mix of subjects and
prompt lengths; the McResult is the same on every rank after the gather.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ift_dist import dist
from ift_dist.config.choices import McScoring, PromptFormat
from ift_dist.config.eval_schema import BenchmarkConfig, benchmark_label
from ift_dist.eval.benchmarks import load_questions, load_shots, open_benchmark
from ift_dist.eval.prompts import answer_texts, build_prompt
from ift_dist.eval.records import LETTERS, Prediction, Question, Subject
from ift_dist.eval.scoring import score_prompts

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
RESULTS_FILE = "results.json"
# markdown_table lists every subject when a run has at most this many; beyond, the categories are the summary.
TABLE_SUBJECT_LIMIT = 12


@dataclass
class McResult:
    """One benchmark's outcome: what was run, every question's prediction, the accuracies, the wall time."""

    label: str  # benchmark_label(cfg): the name results are logged under
    # The BenchmarkConfig fields (enums as strings), the resolved split, the benchmark's layout, the world size.
    settings: dict[str, Any]
    predictions: list[Prediction]  # in question order, as load_questions returns them
    summary: dict[str, Any]  # summarize()
    seconds: float  # wall time of evaluate_benchmark, reading the files included

    @property
    def questions_per_second(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds > 0 else 0.0


def evaluate_benchmark(
    model: Any,
    tokenizer: Any,
    cfg: BenchmarkConfig,
    *,
    device: Any = None,
    synced: bool = False,
    show_progress: bool = True,
) -> McResult:
    """Every rank calls it. Each scores questions rank, rank + W, ... (W = world size; a world of one without
    torch.distributed); the predictions are gathered and the same McResult is returned on every rank.
    synced: ZeRO-3 inside training, where the ranks must run the same number of forwards (score_prompts)."""
    started = time.perf_counter()
    scoring, prompt_format = McScoring(cfg.scoring), PromptFormat(cfg.format)
    label = benchmark_label(cfg)
    benchmark = open_benchmark(cfg.name, cfg.data_dir)
    split = cfg.split or benchmark.eval_split
    questions = load_questions(benchmark, split, cfg.subjects, cfg.limit)
    rank, world = (dist.rank(), dist.world_size()) if dist.is_initialized() else (0, 1)
    mine = questions[rank::world]
    shots = {subject: load_shots(benchmark, subject, cfg.shots) for subject in {q.subject for q in mine}}
    prompts = [
        build_prompt(question, shots[question.subject], benchmark, scoring, prompt_format, tokenizer)
        for question in mine
    ]
    logger.info(
        "%s: %d questions of split %s (%d subjects) over %d ranks, %d on this one; %d-shot, %s scoring, %s prompts",
        label, len(questions), split, len({q.subject for q in questions}), world, len(mine), cfg.shots,
        scoring.value, prompt_format.value,
    )  # fmt: skip
    description = label if world == 1 else f"{label} (rank 0's share)"
    with tqdm(
        total=len(mine), desc=description, unit="question", disable=not show_progress or rank != 0
    ) as bar:
        scores = score_prompts(
            model,
            tokenizer,
            prompts,
            batch_size=cfg.batch_size,
            device=device,
            synced=synced,
            progress=bar.update,
        )
    predictions = _gather(
        [predict(question, row, scoring) for question, row in zip(mine, scores, strict=True)], len(questions)
    )
    settings = {
        **{field.name: _plain(getattr(cfg, field.name)) for field in fields(cfg)},
        "split": split,
        "benchmark_root": str(benchmark.root),
        "layout": benchmark.layout,
        "language": benchmark.language,
        "world_size": world,
    }
    summary = summarize(predictions, benchmark.subjects, scoring)
    return McResult(label, settings, predictions, summary, time.perf_counter() - started)


def predict(question: Question, scores: Sequence[float], scoring: McScoring) -> Prediction:
    """The option with the highest score (the first on ties, as numpy's argmax and lm-eval); for option_text also
    the highest score per character of the option text (lm-eval's acc_norm divides by len(choice))."""
    scores_array = np.asarray(scores, dtype=np.float64)
    predicted_norm = None
    if McScoring(scoring) == McScoring.option_text:
        lengths = np.asarray([float(len(text)) for text in answer_texts(question, scoring)])
        predicted_norm = LETTERS[int(np.argmax(scores_array / lengths))]
    return Prediction(
        benchmark=question.benchmark,
        subject=question.subject,
        id=question.id,
        gold=question.gold,
        predicted=LETTERS[int(np.argmax(scores_array))],
        scores=[float(score) for score in scores],
        predicted_norm=predicted_norm,
    )


def _gather(mine: list[Prediction], total: int) -> list[Prediction]:
    """Every rank's predictions, back in question order: question i was scored by rank i % W, as its (i // W)-th."""
    if not dist.is_initialized() or dist.world_size() == 1:
        return mine
    world = dist.world_size()
    import torch.distributed as torch_dist

    shares: list[list[Prediction]] = [[] for _ in range(world)]
    torch_dist.all_gather_object(shares, mine)
    return [shares[index % world][index // world] for index in range(total)]


def _plain(value: Any) -> Any:
    """A config value as JSON holds it: enums as their value, lists copied."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def summarize(
    predictions: Sequence[Prediction], subjects: dict[str, Subject], scoring: McScoring
) -> dict[str, Any]:
    """Accuracies: "acc" over all questions (micro, lm-eval's group number), "acc_macro" the mean of the subject
    accuracies, per subject and per category (micro and macro over its subjects); for option_text "acc_norm" too
    (micro)."""
    metrics = ("acc", "acc_norm") if McScoring(scoring) == McScoring.option_text else ("acc",)
    # subject -> [questions, correct, correct by acc_norm]
    counts: dict[str, list[int]] = {}
    for prediction in predictions:
        if prediction.subject not in subjects:
            raise ValueError(
                f"prediction {prediction.id}: subject {prediction.subject!r} is not in the benchmark"
            )
        tally = counts.setdefault(prediction.subject, [0, 0, 0])
        tally[0] += 1
        tally[1] += prediction.correct
        tally[2] += prediction.predicted_norm == prediction.gold

    def accuracies(keys: list[str]) -> dict[str, Any]:
        questions = sum(counts[key][0] for key in keys)
        row: dict[str, Any] = {"acc": _ratio(sum(counts[key][1] for key in keys), questions)}
        if "acc_norm" in metrics:
            row["acc_norm"] = _ratio(sum(counts[key][2] for key in keys), questions)
        row["questions"] = questions
        return row

    subject_rows = {
        key: {**accuracies([key]), "category": subjects[key].category, "name": subjects[key].name}
        for key in sorted(counts)
    }

    def group(keys: list[str]) -> dict[str, Any]:
        macro = _ratio(sum(subject_rows[key]["acc"] for key in keys), len(keys))
        return {**accuracies(keys), "acc_macro": macro}

    categories = sorted({row["category"] for row in subject_rows.values()})
    summary = group(list(subject_rows))
    summary["subjects"] = subject_rows
    summary["categories"] = {
        category: group([key for key, row in subject_rows.items() if row["category"] == category])
        for category in categories
    }
    return summary


def _ratio(part: float, whole: int) -> float:
    return part / whole if whole else 0.0


def write_results(out_dir: Path, result: McResult) -> None:
    """out_dir/predictions.jsonl (one Prediction per line, question order) and out_dir/results.json (label,
    settings, summary, seconds, questions per second)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / PREDICTIONS_FILE).open("w", encoding="utf-8") as handle:
        for prediction in result.predictions:
            handle.write(json.dumps(prediction.to_json(), ensure_ascii=False) + "\n")
    record = {
        "label": result.label,
        "settings": result.settings,
        "summary": result.summary,
        "seconds": result.seconds,
        "questions_per_second": result.questions_per_second,
    }
    (out_dir / RESULTS_FILE).write_text(
        json.dumps(record, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )


def markdown_table(result: McResult) -> str:
    """The accuracies as a Markdown table: one row per category, the subjects too when there are few, then all
    questions (micro) and the mean over subjects (macro)."""
    summary, settings = result.summary, result.settings
    normalised = "acc_norm" in summary
    header = ["", "questions", "acc", "acc_macro"] + (["acc_norm"] if normalised else [])
    lines = [
        f"{result.label}: split {settings.get('split')}, {settings.get('shots')}-shot, "
        f"{settings.get('scoring')} scoring, {settings.get('format')} prompts, "
        f"{summary['questions']} questions in {result.seconds:.1f} s ({result.questions_per_second:.1f}/s)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]

    def line(name: str, row: dict[str, Any], macro: bool) -> str:
        cells = [name, str(row["questions"]), f"{row['acc']:.4f}", f"{row['acc_macro']:.4f}" if macro else ""]
        if normalised:
            cells.append(f"{row['acc_norm']:.4f}")
        return "| " + " | ".join(cells) + " |"

    if len(summary["subjects"]) <= TABLE_SUBJECT_LIMIT:
        lines += [line(key, row, macro=False) for key, row in summary["subjects"].items()]
    lines += [line(category, row, macro=True) for category, row in summary["categories"].items()]
    lines.append(line("**all**", summary, macro=True))
    return "\n".join(lines)
