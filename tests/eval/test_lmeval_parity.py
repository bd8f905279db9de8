"""Parity of the multiple-choice evaluation with lm-evaluation-harness on the real SmolLM2-135M-Instruct: the same
prompts, the same per-choice log-likelihoods, the same prediction for (almost) every question, the same accuracy.

lm-eval runs offline on our CSV files with its own task templates (tests/lmeval_local.py). Each configuration is run
once per module, by lm-eval and by evaluate_benchmark, and the tests compare the two. A third implementation, a plain
loop written here (prompt built by hand, one forward per question), checks letter scoring without sharing code with
either.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from lmeval_local import LmEvalRun, run_lmeval
from shared_paths import DATA
from transformers import AutoModelForCausalLM, AutoTokenizer

from ift_dist.config import BenchmarkConfig
from ift_dist.config.choices import McScoring, PromptFormat
from ift_dist.eval.benchmarks import load_questions, load_shots, open_benchmark
from ift_dist.eval.mc import McResult, evaluate_benchmark
from ift_dist.eval.prompts import build_prompt
from ift_dist.eval.records import LETTERS

pytestmark = pytest.mark.slow

EVAL_DATA = DATA / "eval"
# college_mathematics has the literal option "None" in rows 8 and 21; high_school_geography has short questions.
MMLU_SUBJECTS = ("college_mathematics", "high_school_geography")
CEVAL_SUBJECTS = ("computer_network",)
MIN_AGREEMENT = 0.995  # share of questions with the same prediction
ACCURACY_TOLERANCE = 0.001  # 0.1 point
SCORE_TOLERANCE = 1e-3  # absolute, on a summed log-likelihood


@dataclass(frozen=True)
class Case:
    benchmark: str
    scoring: str
    shots: int
    subjects: tuple[str, ...]
    limit: int  # first N questions per subject

    @property
    def name(self) -> str:
        return f"{self.benchmark}-{self.scoring}-{self.shots}shot"


# Few-shot prompts are ~6x longer: fewer questions keep the file within a few minutes on 2 cores.
CASES = [
    Case("mmlu", "letter", 0, MMLU_SUBJECTS, 20),
    Case("mmlu", "letter", 5, MMLU_SUBJECTS, 4),
    Case("mmlu", "option_text", 0, MMLU_SUBJECTS, 10),
    Case("mmlu", "option_text", 5, MMLU_SUBJECTS, 2),
    Case("ceval", "letter", 0, CEVAL_SUBJECTS, 12),
    Case("ceval", "letter", 5, CEVAL_SUBJECTS, 5),
]


def benchmark_config(case: Case) -> BenchmarkConfig:
    return BenchmarkConfig(
        name=case.benchmark,
        data_dir=str(EVAL_DATA),
        subjects=list(case.subjects),
        limit=case.limit,
        shots=case.shots,
        scoring=McScoring(case.scoring),
        format=PromptFormat.plain,
        batch_size=8,
    )


@pytest.fixture(scope="module")
def runs(smollm2_dir):
    """Both implementations on every case, each run at most once per module."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    @cache
    def lmeval(case: Case) -> LmEvalRun:
        return run_lmeval(
            model,
            tokenizer,
            benchmark=case.benchmark,
            subjects=case.subjects,
            scoring=case.scoring,
            shots=case.shots,
            limit=case.limit,
            batch_size=8,
            data_dir=EVAL_DATA,
        )

    @cache
    def ours(case: Case) -> McResult:
        return evaluate_benchmark(model, tokenizer, benchmark_config(case), show_progress=False)

    return model, tokenizer, lmeval, ours


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_prompts_are_lmeval_prompts(case, runs):
    """The text scored for every choice (context + continuation) is the text lm-eval scores."""
    _, tokenizer, lmeval, _ = runs
    reference = lmeval(case).answers
    benchmark = open_benchmark(case.benchmark, str(EVAL_DATA))
    questions = load_questions(benchmark, benchmark.eval_split, list(case.subjects), case.limit)
    assert [question.id for question in questions] == list(reference)
    for question in questions:
        shots = load_shots(benchmark, question.subject, case.shots)
        prompt = build_prompt(
            question, shots, benchmark, McScoring(case.scoring), PromptFormat.plain, tokenizer
        )
        answer = reference[question.id]
        assert [prompt.context + continuation for continuation in prompt.continuations] == [
            answer.context + continuation for continuation in answer.continuations
        ], question.id


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_predictions_agree_with_lmeval(case, runs):
    _, _, lmeval, ours = runs
    reference, result = lmeval(case), ours(case)
    predictions = {prediction.id: prediction for prediction in result.predictions}
    assert list(predictions) == list(reference.answers), "the same questions in the same order"

    agree = sum(
        predictions[id].predicted == LETTERS[answer.predicted] for id, answer in reference.answers.items()
    )
    assert agree / len(predictions) >= MIN_AGREEMENT, f"{agree}/{len(predictions)} predictions agree"
    assert result.summary["acc"] == pytest.approx(reference.metrics["acc"], abs=ACCURACY_TOLERANCE)
    for id, answer in reference.answers.items():
        assert predictions[id].gold == LETTERS[answer.gold], id
        assert predictions[id].scores == pytest.approx(answer.scores, abs=SCORE_TOLERANCE), id

    if case.scoring == "option_text":
        agree_norm = sum(
            predictions[id].predicted_norm == LETTERS[answer.predicted_norm]
            for id, answer in reference.answers.items()
        )
        assert agree_norm / len(predictions) >= MIN_AGREEMENT, (
            f"{agree_norm}/{len(predictions)} acc_norm agree"
        )
        assert result.summary["acc_norm"] == pytest.approx(
            reference.metrics["acc_norm"], abs=ACCURACY_TOLERANCE
        )


def _hand_written_letter_scores(model, tokenizer, subject: str, limit: int) -> list[tuple[str, list[float]]]:
    """(gold letter, log-probability of " A".." D") for the first `limit` test questions of an MMLU subject, 0-shot:
    the CSV read with the csv module, lm-eval's MMLU prompt typed out, one forward per question."""
    letter_ids = [tokenizer(f" {letter}", add_special_tokens=False).input_ids for letter in LETTERS]
    assert all(len(ids) == 1 for ids in letter_ids), "each answer letter is one token"
    path = EVAL_DATA / "mmlu" / "test" / f"{subject}_test.csv"
    with path.open(newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))[:limit]
    results = []
    for question, *options, gold in rows:
        prompt = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        prompt += question.strip() + "".join(
            f"\n{letter}. {option}" for letter, option in zip(LETTERS, options)
        )
        prompt += "\nAnswer:"
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)  # [V]
        results.append((gold, [log_probs[token_ids[0]].item() for token_ids in letter_ids]))
    return results


def test_letter_matches_a_hand_written_loop(runs):
    model, tokenizer, _, ours = runs
    case = CASES[0]
    assert case.scoring == "letter" and case.shots == 0
    result = ours(case)
    expected = []
    for subject in case.subjects:
        expected += _hand_written_letter_scores(model, tokenizer, subject, case.limit)
    assert len(result.predictions) == len(expected)
    correct = 0
    for prediction, (gold, scores) in zip(result.predictions, expected, strict=True):
        predicted = LETTERS[max(range(len(scores)), key=scores.__getitem__)]
        assert prediction.gold == gold, prediction.id
        assert prediction.predicted == predicted, prediction.id
        assert prediction.scores == pytest.approx(scores, abs=SCORE_TOLERANCE), prediction.id
        correct += predicted == gold
    assert result.summary["acc"] == pytest.approx(correct / len(expected), abs=1e-9)
