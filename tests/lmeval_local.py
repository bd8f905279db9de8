"""lm-evaluation-harness run offline on our local benchmark CSVs, its answers returned per question: the reference
the multiple-choice evaluation is compared against (tests/eval/test_lmeval_parity.py, bench/eval_throughput.py).

How lm-eval is pointed at the local files (no download, no Hub access):

- For every subject a task YAML is written to a temporary directory, which is given to lm-eval as
  `TaskManager(include_path=<dir>)`. The YAML `include`s lm-eval's own task file by absolute path
  (`lm_eval/tasks/mmlu/default/mmlu_<subject>.yaml` for letter scoring,
  `lm_eval/tasks/mmlu/continuation/mmlu_<subject>.yaml` for option-text scoring,
  `lm_eval/tasks/ceval/ceval-valid_<subject>.yaml` for C-Eval), so `description`, `doc_to_text`,
  `doc_to_choice`, `doc_to_target`, the few-shot split and sampler (`dev`, `first_n`) and the metrics are
  lm-eval's, unchanged (`include_defaults=False`: the built-in task index is not needed). Only where the data
  comes from is overridden:

      include: <site-packages>/lm_eval/tasks/mmlu/default/mmlu_abstract_algebra.yaml
      task: local_mmlu_letter_abstract_algebra
      tag: []
      dataset_path: csv
      dataset_name: null
      dataset_kwargs:
        data_files: {test: <data>/mmlu/test/abstract_algebra_test.csv, dev: <data>/mmlu/dev/abstract_algebra_dev.csv}
        column_names: [question, A, B, C, D, answer]      # MMLU CSVs have no header
        keep_default_na: false                             # the literal option "None" stays a string
        converters: {question: !function builtins.str, A: !function builtins.str, ...}   # "0.50" stays "0.50"
      process_docs: !function lmeval_local.mmlu_docs       # row -> cais/mmlu's {question, choices, answer}

  `dataset_path: csv` makes lm-eval call `datasets.load_dataset("csv", data_files=...)`, Hugging Face's CSV
  builder on the local files. MMLU's templates read `choices` (a list) and `answer` (an index), the layout of the
  Hub's cais/mmlu, so `process_docs` (this module's `mmlu_docs`) turns each CSV row into that layout; it is applied to
  the few-shot (dev) rows as well. C-Eval's CSVs have a header and already have the Hub's columns (id, question,
  A..D, answer[, explanation]), so its YAML only sets the data files (`val` and `dev`, the split names of its
  YAML), `usecols` (the dev files' extra explanation column dropped: the CSV builder wants the same columns in
  every split) and the string converters. `!function lmeval_local.mmlu_docs` is resolved by importing this module,
  so tests/ must be on sys.path (the root conftest puts it there; bench/eval_throughput.py adds it). The converters keep every cell the exact text of the file: pandas would otherwise read an option
  column of numbers as floats and print "0.50" as "0.5".
- `HF_DATASETS_OFFLINE=1`, `HF_HUB_OFFLINE=1` and a temporary `HF_DATASETS_CACHE` are set while lm-eval runs.
- The model is the caller's instance: `HFLM(pretrained=model, tokenizer=tokenizer, batch_size=...)`, run by
  `lm_eval.simple_evaluate(..., num_fewshot=shots, limit=limit, log_samples=True)`; `limit` is per task, so the
  first N rows of each subject, as BenchmarkConfig.limit.
- The answers are read from the logged samples: `filtered_resps` holds one (log-likelihood, is_greedy) pair per
  choice, `arguments` the (context, continuation) pairs that were scored.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

# The reference side imports nothing from ift_dist, so that it cannot share a mistake with the code it checks.
LETTERS = ("A", "B", "C", "D")
DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "eval"
MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")
CEVAL_COLUMNS = ("id", "question", "A", "B", "C", "D", "answer")


@dataclass(frozen=True)
class Variant:
    """One lm-eval task family and how its files are found."""

    benchmark: str  # mmlu or ceval (the folder under the data directory)
    scoring: str  # letter or option_text (McScoring's values)
    task_file: str  # lm-eval's task YAML of a subject, relative to lm_eval/tasks, with {subject}
    eval_split: str  # the split name lm-eval's YAML evaluates (its test_split or validation_split)
    eval_folder: str  # our folder of that split


VARIANTS = {
    ("mmlu", "letter"): Variant("mmlu", "letter", "mmlu/default/mmlu_{subject}.yaml", "test", "test"),
    ("mmlu", "option_text"): Variant(
        "mmlu", "option_text", "mmlu/continuation/mmlu_{subject}.yaml", "test", "test"
    ),
    ("ceval", "letter"): Variant("ceval", "letter", "ceval/ceval-valid_{subject}.yaml", "val", "val"),
}


@dataclass(frozen=True)
class LmEvalAnswer:
    """lm-eval's result for one question (one doc of a subject task)."""

    subject: str
    row: int  # 0-based data row of the subject's CSV (lm-eval's doc_id)
    gold: int
    scores: tuple[float, ...]  # summed log-likelihood of each continuation
    predicted: int  # argmax of scores (lm-eval's acc)
    predicted_norm: int  # argmax of scores / len(choice) in characters (lm-eval's acc_norm)
    context: str  # the scored context, few-shot examples and description included
    continuations: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.subject}/{self.row}"


@dataclass
class LmEvalRun:
    """All answers of one simple_evaluate call, and the metrics lm-eval aggregated."""

    answers: dict[str, LmEvalAnswer]  # by id "<subject>/<row>", subjects in the order asked, rows ascending
    # lm-eval's per-question acc (and acc_norm where its task computes it) averaged over all questions (micro).
    metrics: dict[str, float]
    seconds: float  # wall time of simple_evaluate (task loading included)


def mmlu_docs(dataset):
    """A split of MMLU CSV rows (question, A..D, answer letter) in cais/mmlu's layout (question, choices, answer index)."""
    # A new column renamed afterwards: map would cast a returned "answer" back to the letter column's string type.
    converted = dataset.map(
        lambda row: {"choices": [row[letter] for letter in LETTERS], "gold": LETTERS.index(row["answer"])},
        remove_columns=[*LETTERS, "answer"],
    )
    return converted.rename_column("gold", "answer")


def lmeval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


def _as_text(columns: Sequence[str]) -> dict[str, Any]:
    # A tag object the YAML dumper writes as `!function builtins.str`.
    return {column: _FunctionTag("builtins.str") for column in columns}


class _FunctionTag(str):
    pass


def _represent_function(dumper: yaml.SafeDumper, tag: _FunctionTag) -> yaml.Node:
    return dumper.represent_scalar("!function", str(tag))


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_FunctionTag, _represent_function)


def task_name(variant: Variant, subject: str) -> str:
    return f"local_{variant.benchmark}_{variant.scoring}_{subject}"


def task_yaml(variant: Variant, subject: str, data_dir: Path) -> dict[str, Any]:
    """The task config that reuses lm-eval's subject task with our CSV files as its data."""
    folder = data_dir / variant.benchmark
    eval_file = folder / variant.eval_folder / f"{subject}_{variant.eval_folder}.csv"
    dev_file = folder / "dev" / f"{subject}_dev.csv"
    for path in (eval_file, dev_file):
        if not path.is_file():
            raise FileNotFoundError(path)
    upstream = lmeval_tasks_dir() / variant.task_file.format(subject=subject)
    if not upstream.is_file():
        raise FileNotFoundError(f"lm-eval has no task file {upstream}")
    dataset_kwargs: dict[str, Any] = {
        "data_files": {variant.eval_split: str(eval_file), "dev": str(dev_file)},
        "keep_default_na": False,
    }
    config: dict[str, Any] = {
        "include": str(upstream),
        "task": task_name(variant, subject),
        "tag": [],
        "dataset_path": "csv",
        "dataset_name": None,
        "dataset_kwargs": dataset_kwargs,
    }
    if variant.benchmark == "mmlu":
        dataset_kwargs["column_names"] = list(MMLU_COLUMNS)
        dataset_kwargs["converters"] = _as_text(MMLU_COLUMNS)
        config["process_docs"] = _FunctionTag(f"{__name__}.mmlu_docs")
    else:
        # The dev files have one more column (explanation); the CSV builder needs the same columns in every split.
        dataset_kwargs["usecols"] = list(CEVAL_COLUMNS)
        dataset_kwargs["converters"] = _as_text(CEVAL_COLUMNS)
    return config


def write_task_yamls(directory: Path, variant: Variant, subjects: Sequence[str], data_dir: Path) -> list[str]:
    """One YAML per subject in directory; returns the task names."""
    names = []
    for subject in subjects:
        config = task_yaml(variant, subject, data_dir)
        path = directory / f"{config['task']}.yaml"
        path.write_text(yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True))
        names.append(config["task"])
    return names


@contextmanager
def offline_environment(cache_dir: Path) -> Iterator[None]:
    """HF_DATASETS_OFFLINE, HF_HUB_OFFLINE and HF_DATASETS_CACHE set for the duration, restored afterwards."""
    values = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache_dir)}
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_lmeval(
    model,
    tokenizer,
    *,
    benchmark: str,
    subjects: Sequence[str],
    scoring: str = "letter",
    shots: int = 0,
    limit: int = 0,
    batch_size: int = 8,
    data_dir: Path | None = None,
) -> LmEvalRun:
    """lm-eval's answers for the first `limit` questions (0 = all) of each subject, with `shots` few-shot examples."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    variant = VARIANTS[(benchmark, scoring)]
    data_dir = data_dir or DATA_DIR
    with tempfile.TemporaryDirectory(prefix="lmeval-local-") as temporary:
        temporary = Path(temporary)
        (temporary / "tasks").mkdir()
        names = write_task_yamls(temporary / "tasks", variant, subjects, data_dir)
        with offline_environment(temporary / "datasets"):
            started = time.perf_counter()
            results = lm_eval.simple_evaluate(
                model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                tasks=names,
                num_fewshot=shots,
                limit=limit or None,
                log_samples=True,
                # Our YAMLs include lm-eval's files by path: indexing its ~10,000 built-in tasks would only cost time.
                task_manager=TaskManager(include_path=str(temporary / "tasks"), include_defaults=False),
                bootstrap_iters=0,
            )
            seconds = time.perf_counter() - started
    answers: dict[str, LmEvalAnswer] = {}
    metrics: dict[str, list[float]] = {}
    for subject, name in zip(subjects, names, strict=True):
        for sample in sorted(results["samples"][name], key=lambda sample: sample["doc_id"]):
            answer = _answer(subject, sample)
            answers[answer.id] = answer
            for metric in ("acc", "acc_norm"):
                if metric in sample:
                    metrics.setdefault(metric, []).append(float(sample[metric]))
    means = {metric: sum(values) / len(values) for metric, values in metrics.items()}
    return LmEvalRun(answers=answers, metrics=means, seconds=seconds)


def _answer(subject: str, sample: dict[str, Any]) -> LmEvalAnswer:
    scores = tuple(float(loglikelihood) for loglikelihood, _ in sample["filtered_resps"])
    arguments = sample["arguments"]
    contexts = {context for context, _ in _pairs(arguments)}
    if len(contexts) != 1:
        raise ValueError(
            f"{subject} doc {sample['doc_id']}: the choices were scored after different contexts"
        )
    continuations = tuple(continuation for _, continuation in _pairs(arguments))
    # lm-eval's acc_norm divides by the length of the choice text, without the target delimiter
    lengths = [
        len(continuation) - len(" ") if continuation.startswith(" ") else len(continuation)
        for continuation in continuations
    ]
    predicted = max(range(len(scores)), key=lambda index: scores[index])
    predicted_norm = max(range(len(scores)), key=lambda index: scores[index] / lengths[index])
    # The argmax taken here must be the one lm-eval scored (its per-sample metric is 1.0 when it hit the gold).
    gold = int(sample["target"])
    for metric, index in (("acc", predicted), ("acc_norm", predicted_norm)):
        if metric in sample and float(sample[metric]) != float(index == gold):
            raise ValueError(f"{subject} doc {sample['doc_id']}: lm-eval's {metric} disagrees with {index}")
    return LmEvalAnswer(
        subject=subject,
        row=int(sample["doc_id"]),
        gold=gold,
        scores=scores,
        predicted=predicted,
        predicted_norm=predicted_norm,
        context=contexts.pop(),
        continuations=continuations,
    )


def _pairs(arguments: Any) -> list[tuple[str, str]]:
    # arguments is {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...} in logged samples
    if isinstance(arguments, dict):
        return [(value["arg_0"], value["arg_1"]) for value in arguments.values()]
    return [(context, continuation) for context, continuation in arguments]
