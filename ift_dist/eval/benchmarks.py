"""A multiple-choice benchmark's CSV files -> Questions, in one of three layouts (MMLU, C-Eval, CMMLU).

Layouts (docs/eval.md; the data READMEs under ../shared/data/eval describe the copies):

    layout  files                           header                          language  evaluation split
    mmlu    <split>/<subject>_<split>.csv   none, 6 fields                  en        test
    ceval   <split>/<subject>_<split>.csv   id,question,A,B,C,D,answer      zh        val
    cmmlu   <split>/<subject>.csv           ,Question,A,B,C,D,Answer        zh        test

The dev split holds the few-shot examples (C-Eval's dev rows carry an extra `explanation` field). Subjects
come from the benchmark's mapping.json ({key: {name, category}}); a custom directory without one gets its
subjects from the file names.

Policy on bad input: a benchmark is curated data, so a bad row (wrong number of fields, empty question
or option, answer outside A-D) or a missing subject file means a damaged copy. Loading raises BenchmarkError
naming the file, the line and the field, before anything is scored; no row is skipped, as a skipped row would
silently change the score.
"""

from __future__ import annotations

import csv
import difflib
import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ift_dist.config.eval_schema import BENCHMARK_NAMES, BenchmarkConfig, benchmark_label
from ift_dist.eval.records import LETTERS, Question, Subject

logger = logging.getLogger(__name__)

# Where mmlu/, ceval/ and cmmlu/ live when neither data_dir nor $IFT_EVAL_DATA says: ../shared/data/eval
# beside the repository.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"
DATA_DIR_VARIABLE = "IFT_EVAL_DATA"
DEV_SPLIT = "dev"
SPLITS = ("test", "val", "dev")


@dataclass(frozen=True)
class Layout:
    """How one layout names its files and lays out a row."""

    name: str
    header: tuple[str, ...] | None  # the first row of every file, or None when files have no header
    question_column: int  # index of the question field; A-D follow it, then the answer
    suffixed: bool  # file names carry the split: <subject>_<split>.csv
    language: str
    eval_split: str

    @property
    def fields(self) -> int:
        return self.question_column + 6

    def file_name(self, subject: str, split: str) -> str:
        return f"{subject}_{split}.csv" if self.suffixed else f"{subject}.csv"


LAYOUTS = {
    "mmlu": Layout("mmlu", None, 0, suffixed=True, language="en", eval_split="test"),
    "ceval": Layout(
        "ceval",
        ("id", "question", "A", "B", "C", "D", "answer"),
        1,
        suffixed=True,
        language="zh",
        eval_split="val",
    ),
    "cmmlu": Layout(
        "cmmlu",
        ("", "Question", "A", "B", "C", "D", "Answer"),
        1,
        suffixed=False,
        language="zh",
        eval_split="test",
    ),
}
# C-Eval's dev split adds a worked explanation after the answer.
EXPLANATION_FIELD = "explanation"


class BenchmarkError(ValueError):
    """A benchmark that cannot be read as it is: the message names the file, the line and the field."""


@dataclass(frozen=True)
class Benchmark:
    """An opened benchmark: where its files are, how they are laid out, and its subjects."""

    name: str  # mmlu / ceval / cmmlu, or the directory name of a custom benchmark (benchmark_label)
    root: Path
    layout: str  # "mmlu" | "ceval" | "cmmlu": the CSV layout (detected for a custom directory)
    language: str  # "en" (mmlu layout) or "zh" (ceval, cmmlu layouts)
    subjects: dict[str, Subject]  # key -> Subject, sorted by key
    eval_split: str  # the default split: test (mmlu, cmmlu), val (ceval)

    def subject_file(self, subject: str, split: str) -> Path:
        return self.root / split / LAYOUTS[self.layout].file_name(subject, split)


@dataclass(frozen=True)
class _Row:
    """One CSV record and the physical line it starts on (1-based)."""

    line: int
    fields: tuple[str, ...]


def open_benchmark(name_or_path: str, data_dir: str = "") -> Benchmark:
    """A benchmark by name (mmlu, ceval, cmmlu; found under data_dir, else $IFT_EVAL_DATA, else
    ../shared/data/eval) or by the path of a directory in the layout of one of them."""
    if name_or_path in BENCHMARK_NAMES:
        base = Path(data_dir or os.environ.get(DATA_DIR_VARIABLE) or DEFAULT_DATA_DIR)
        root = base / name_or_path
        if not root.is_dir():
            raise BenchmarkError(
                f"{root}: benchmark {name_or_path!r} not found (set the data directory with data_dir or "
                f"${DATA_DIR_VARIABLE}; nothing is downloaded)"
            )
        layout = LAYOUTS[name_or_path]
        name = name_or_path
    else:
        root = Path(name_or_path)
        if not root.is_dir():
            raise BenchmarkError(
                f"{root}: not a directory, and not one of the benchmark names {', '.join(BENCHMARK_NAMES)}"
            )
        layout = _detect_layout(root)
        name = benchmark_label(BenchmarkConfig(name=name_or_path))
    subjects = _read_subjects(root, layout)
    logger.debug("benchmark %s at %s: layout %s, %d subjects", name, root, layout.name, len(subjects))
    return Benchmark(
        name=name,
        root=root,
        layout=layout.name,
        language=layout.language,
        subjects=subjects,
        eval_split=layout.eval_split,
    )


def load_questions(
    benchmark: Benchmark, split: str = "", subjects: Sequence[str] = (), limit: int = 0
) -> list[Question]:
    """The questions of a split ("" = the benchmark's evaluation split): the chosen subjects (empty = all) in
    key order, each one's rows in file order, the first `limit` rows of each subject when limit > 0."""
    split = split or benchmark.eval_split
    questions: list[Question] = []
    for subject in _select_subjects(benchmark, subjects):
        rows = _subject_rows(benchmark, subject, split)
        questions.extend(rows[:limit] if limit > 0 else rows)
    return questions


def load_shots(benchmark: Benchmark, subject: str, count: int) -> list[Question]:
    """The first `count` rows of a subject's dev split: lm-eval's first_n few-shot sampler."""
    if count <= 0:
        return []
    _select_subjects(benchmark, [subject])
    rows = _subject_rows(benchmark, subject, DEV_SPLIT)
    if count > len(rows):
        path = benchmark.subject_file(subject, DEV_SPLIT)
        raise BenchmarkError(f"{path}: {count} few-shot examples asked for, the file has {len(rows)}")
    return rows[:count]


def _select_subjects(benchmark: Benchmark, subjects: Sequence[str]) -> list[str]:
    if not subjects:
        return list(benchmark.subjects)
    for subject in subjects:
        if subject not in benchmark.subjects:
            close = difflib.get_close_matches(subject, list(benchmark.subjects), n=5)
            known = close if close else list(benchmark.subjects)
            label = "close matches" if close else "known subjects"
            raise BenchmarkError(
                f"{benchmark.root}: subject {subject!r} is not in benchmark {benchmark.name!r}; "
                f"{label}: {', '.join(known)}"
            )
    return sorted(set(subjects))


def _subject_rows(benchmark: Benchmark, subject: str, split: str) -> list[Question]:
    path = benchmark.subject_file(subject, split)
    if not path.is_file():
        if not path.parent.is_dir():
            raise BenchmarkError(f"{path.parent}: split {split!r} of benchmark {benchmark.name!r} not found")
        raise BenchmarkError(
            f"{path}: missing (subject {subject!r} is listed in {benchmark.root / 'mapping.json'})"
            if (benchmark.root / "mapping.json").is_file()
            else f"{path}: missing (subject {subject!r})"
        )
    # The modification time is part of the cache key: a file rewritten in the same process is read again.
    return list(_parse_file(path, path.stat().st_mtime_ns, benchmark.layout, benchmark.name, subject))


@functools.lru_cache(maxsize=512)
def _parse_file(
    path: Path, modified_ns: int, layout_name: str, benchmark: str, subject: str
) -> tuple[Question, ...]:
    """Every row of one subject file as Questions, validated; cached, as shots are read once per question."""
    layout = LAYOUTS[layout_name]
    rows = _read_rows(path)
    if layout.header is not None:
        if not rows or rows[0].fields[: len(layout.header)] != layout.header:
            found = ",".join(rows[0].fields) if rows else "an empty file"
            raise BenchmarkError(f"{path}:1: header: expected {','.join(layout.header)!r}, found {found!r}")
        header, rows = rows[0].fields, rows[1:]
    else:
        header = ()
    explanation_column = header.index(EXPLANATION_FIELD) if EXPLANATION_FIELD in header else -1
    # The expected width: the layout's, or the header's when it adds columns (C-Eval's dev explanation).
    width = max(layout.fields, len(header))
    column_names = header or ("question", *LETTERS, "answer")
    questions = []
    for index, row in enumerate(rows):
        where = f"{path}:{row.line}"
        if len(row.fields) != width:
            raise BenchmarkError(
                f"{where}: fields: expected {width} ({','.join(column_names)}), found {len(row.fields)}"
            )
        start = layout.question_column
        question = row.fields[start]
        choices = row.fields[start + 1 : start + 5]
        answer = row.fields[start + 5].strip()
        if not question.strip():
            raise BenchmarkError(f"{where}: {column_names[start]}: empty question")
        for letter, choice in zip(LETTERS, choices, strict=True):
            if not choice.strip():
                raise BenchmarkError(f"{where}: {letter}: empty option")
        if answer not in LETTERS:
            raise BenchmarkError(
                f"{where}: {column_names[start + 5]}: {answer!r} is not one of {', '.join(LETTERS)}"
            )
        questions.append(
            Question(
                benchmark=benchmark,
                subject=subject,
                id=f"{subject}/{index}",
                question=question,
                choices=tuple(choices),
                answer=LETTERS.index(answer),
                source=where,
                explanation=row.fields[explanation_column] if explanation_column >= 0 else "",
            )
        )
    return tuple(questions)


def _read_rows(path: Path) -> list[_Row]:
    """The records of a CSV file with the physical line each starts on. The csv module keeps every cell a
    string (MMLU's options that read "None" stay "None"); newline="" keeps quoted line breaks as they are and
    counts CRLF as one line end, so csv's line_num is the physical line a record ends on."""
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        last_line = 0
        try:
            for fields in reader:
                if fields:  # a blank line carries no record
                    rows.append(_Row(last_line + 1, tuple(fields)))
                last_line = reader.line_num
        except csv.Error as error:
            raise BenchmarkError(f"{path}:{last_line + 1}: fields: {error}") from error
    return rows


def _detect_layout(root: Path) -> Layout:
    """The layout of a custom directory, from the first row of one file, checked against every file's name."""
    files = {split: sorted((root / split).glob("*.csv")) for split in SPLITS}
    sample = next((paths[0] for paths in files.values() if paths), None)
    if sample is None:
        raise BenchmarkError(
            f"{root}: no CSV files under {'/, '.join(SPLITS)}/ (expected <split>/<subject>*.csv)"
        )
    first = _read_rows(sample)[:1]
    first_fields = first[0].fields if first else ()
    for layout in LAYOUTS.values():
        if layout.header is not None and first_fields[: len(layout.header)] == layout.header:
            break
    else:
        layout = LAYOUTS["mmlu"]
        if len(first_fields) != layout.fields:
            headers = " nor ".join(
                f"{','.join(known.header)!r} ({known.name})" for known in LAYOUTS.values() if known.header
            )
            raise BenchmarkError(
                f"{sample}:1: fields: not a known layout: the header is neither {headers}, "
                f"and a headerless (mmlu) row has 6 fields, found {len(first_fields)}"
            )
    for split, paths in files.items():
        unsuffixed = [path for path in paths if not path.stem.endswith(f"_{split}")]
        # A cmmlu subject may end in _test by chance, but not every one of them.
        misnamed = unsuffixed if layout.suffixed else ([] if unsuffixed else paths)
        if misnamed:
            expected = layout.file_name("<subject>", split)
            raise BenchmarkError(
                f"{misnamed[0]}: the rows are in the {layout.name} layout, "
                f"whose files are named {split}/{expected}"
            )
    return layout


def _read_subjects(root: Path, layout: Layout) -> dict[str, Subject]:
    mapping_path = root / "mapping.json"
    if mapping_path.is_file():
        try:
            mapping = json.loads(mapping_path.read_text(encoding="utf-8"))
            subjects = [Subject(key, entry["name"], entry["category"]) for key, entry in mapping.items()]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise BenchmarkError(
                f'{mapping_path}: expected {{subject: {{"name": ..., "category": ...}}}}: {error!r}'
            ) from error
    else:
        # No mapping: every file name of the evaluation split (or of any split) is a subject.
        split_dirs = [root / layout.eval_split, *(root / split for split in SPLITS)]
        split_dir = next((path for path in split_dirs if any(path.glob("*.csv"))), None)
        if split_dir is None:
            raise BenchmarkError(f"{root}: neither a mapping.json nor CSV files under {'/, '.join(SPLITS)}/")
        suffix = f"_{split_dir.name}" if layout.suffixed else ""
        keys = [path.stem.removesuffix(suffix) for path in split_dir.glob("*.csv")]
        subjects = [Subject(key, key.replace("_", " "), "Other") for key in keys]
    if not subjects:
        raise BenchmarkError(f"{mapping_path}: no subjects")
    return {subject.key: subject for subject in sorted(subjects, key=lambda subject: subject.key)}
