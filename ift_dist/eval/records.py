"""The records evaluation stages pass to each other: a benchmark's Subject and Question, the McPrompt scored for a
question, and the Prediction that comes back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Subject:
    """One subject of a benchmark, from its mapping file."""

    key: str  # the file stem: abstract_algebra
    name: str  # as prompts name it: "abstract algebra" (MMLU), 注册会计师 (C-Eval, CMMLU)
    category: str  # STEM, Humanities, Social Sciences or Other


@dataclass(frozen=True)
class Question:
    """One multiple-choice question as read from its CSV row."""

    benchmark: str  # mmlu, ceval, cmmlu, or the directory name of a custom benchmark
    subject: str  # Subject.key
    id: str  # unique within the benchmark and split: "<subject>/<row>" (row = 0-based data row of the file)
    question: str
    choices: tuple[str, ...]  # the option texts, A first
    answer: int  # index of the gold option in choices
    source: str  # "<file>:<line>" of the row, for messages
    explanation: str = ""  # C-Eval's dev split has one

    @property
    def gold(self) -> str:
        return LETTERS[self.answer]


@dataclass(frozen=True)
class McPrompt:
    """What is scored for one question: a context and one continuation per option, as lm-eval's loglikelihood
    requests (context + continuation is the full text; the scorer moves a context's trailing spaces to the
    continuation, as lm-eval does)."""

    context: str
    continuations: tuple[str, ...]


@dataclass
class Prediction:
    """The scores of one question and what they predict. For option_text, predicted_norm is the argmax of the scores
    divided by the continuations' lengths in characters (lm-eval's acc_norm)."""

    benchmark: str
    subject: str
    id: str
    gold: str
    predicted: str
    scores: list[float]  # summed log-likelihood of each continuation
    predicted_norm: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return self.predicted == self.gold

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["correct"] = self.correct
        if self.predicted_norm is None:
            record.pop("predicted_norm")
        if not self.extra:
            record.pop("extra")
        return record
