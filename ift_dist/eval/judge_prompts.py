"""The judge protocol: the messages sent for one answer turn (single) or one ordered pair (pairwise), and the
verdict format they ask for, read back.

The prompt texts are MT-bench's judge prompts, copied verbatim as data from FastChat
(https://github.com/lm-sys/FastChat, fastchat/llm_judge/data/judge_prompts.jsonl as last changed in commit
7ad1d63, July 2023), published by LMSYS under the Apache License 2.0 (Zheng et al., "Judging LLM-as-a-Judge with
MT-Bench and Chatbot Arena", 2023). The code that reads the verdicts back is ours.
Each template is a system prompt plus a user prompt with `{name}` slots; which one is used depends on the mode,
the turn (turn 2 is judged on the whole conversation) and whether the category is graded against a reference.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# MT-bench grades these categories against the reference answer when the set ships one (FastChat's NEED_REF_CATS).
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")

# The published templates judge the first two turns; a third turn has no template.
MAX_JUDGED_TURNS = 2


@dataclass(frozen=True)
class JudgeTemplate:
    name: str  # FastChat's name, recorded in every judgment
    system: str
    user: str  # str.format template


@dataclass(frozen=True)
class AnswerRecord:
    """The fields of one answers.jsonl line (docs: the answers contract) that judging reads."""

    id: str
    category: str | None
    turns: tuple[str, ...]  # user turns
    answers: tuple[str, ...]  # one assistant answer per turn
    reference: tuple[str, ...] | None  # one reference answer per turn, or None
    sample: int

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> AnswerRecord:
        turns, answers = tuple(row["turns"]), tuple(row["answers"])
        if len(turns) != len(answers):
            raise ValueError(f"id {row['id']}: {len(turns)} turns but {len(answers)} answers")
        reference = row.get("reference")
        return cls(
            id=str(row["id"]),
            category=row.get("category"),
            turns=turns,
            answers=answers,
            reference=tuple(r if r is not None else "" for r in reference) if reference else None,
            sample=int(row.get("sample", 0)),
        )

    @property
    def key(self) -> tuple[str, int]:
        """What pairs this record with the baseline's record of the same prompt and sample."""
        return (self.id, self.sample)


def read_answers(path: Path) -> list[AnswerRecord]:
    """The records of an answers.jsonl, or of DIR/answers.jsonl (an `ift eval generate` output directory); a bad
    record is a ValueError naming it."""
    from ift_dist.eval.answers_file import answers_path
    from ift_dist.eval.answers_file import read_answers as read_rows

    path = answers_path(path)
    records = []
    for number, row in enumerate(read_rows(path), start=1):
        try:
            records.append(AnswerRecord.from_json(row))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: record {number}: not an answers.jsonl record: {error!r}") from None
    return records


_PAIR_VERDICT_FORMAT = (
    'After providing your explanation, output your final verdict by strictly following this format: "[[A]]" if '
    'assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
_PAIR_FAIRNESS = (
    "Avoid any position biases and ensure that the order in which the responses were presented does not "
    "influence your decision. Do not allow the length of the responses to influence your evaluation. Do not "
    "favor certain names of the assistants. Be as objective as possible. "
)
_RATING_FORMAT = (
    "After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following "
    'this format: "[[rating]]", for example: "Rating: [[5]]".'
)
_CONVERSATION = (
    "<|The Start of Assistant {who}'s Conversation with User|>\n\n### User:\n{{question_1}}\n\n"
    "### Assistant {who}:\n{{answer{slot}_1}}\n\n### User:\n{{question_2}}\n\n### Assistant {who}:\n"
    "{{answer{slot}_2}}\n\n<|The End of Assistant {who}'s Conversation with User|>"
)
_REFERENCE_CONVERSATION = (
    "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}\n\n"
    "### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of Reference Answer|>\n\n\n"
)
_TWO_CONVERSATIONS = (
    _CONVERSATION.format(who="A", slot="_a") + "\n\n\n" + _CONVERSATION.format(who="B", slot="_b")
)
_TWO_ANSWERS = (
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)

TEMPLATES = {
    t.name: t
    for t in (
        JudgeTemplate(
            "pair-v2",
            "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
            "assistants to the user question displayed below. You should choose the assistant that follows the "
            "user's instructions and answers the user's question better. Your evaluation should consider "
            "factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of "
            "their responses. Begin your evaluation by comparing the two responses and provide a short "
            "explanation. " + _PAIR_FAIRNESS + _PAIR_VERDICT_FORMAT,
            "[User Question]\n{question}\n\n" + _TWO_ANSWERS,
        ),
        JudgeTemplate(
            "pair-v2-multi-turn",
            "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
            "assistants to the user questions. You should choose the assistant that follows the user's "
            "instructions and answers the user's questions better. Your evaluation should consider factors "
            "such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of their "
            "responses. You should focus on who provides a better answer to the second user question. Begin "
            "your evaluation by comparing the responses of the two assistants and provide a short explanation. "
            + _PAIR_FAIRNESS
            + _PAIR_VERDICT_FORMAT,
            _TWO_CONVERSATIONS,
        ),
        JudgeTemplate(
            "pair-math-v1",
            "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
            "assistants to the user question displayed below. Your evaluation should consider correctness and "
            "helpfulness. You will be given a reference answer, assistant A's answer, and assistant B's answer. "
            "Your job is to evaluate which assistant's answer is better. Begin your evaluation by comparing both "
            "assistants' answers with the reference answer. Identify and correct any mistakes. "
            + _PAIR_FAIRNESS
            + _PAIR_VERDICT_FORMAT,
            "[User Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n"
            "[The End of Reference Answer]\n\n" + _TWO_ANSWERS,
        ),
        JudgeTemplate(
            "pair-math-v1-multi-turn",
            "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
            "assistants to the user questions. Your evaluation should consider correctness and helpfulness. You "
            "will be given reference answers, the assistant A's answers, the assistant B's answers. Your job is "
            "to determine which assistant provides correct and helpful answers to the second user question. "
            "Begin your evaluation by comparing both assistants' answers with the reference answers. Identify "
            "and correct any mistakes. " + _PAIR_FAIRNESS + _PAIR_VERDICT_FORMAT,
            _REFERENCE_CONVERSATION + _TWO_CONVERSATIONS,
        ),
        JudgeTemplate(
            "single-v1",
            "You are a helpful assistant.",
            "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided "
            "by an AI assistant to the user question displayed below. Your evaluation should consider factors "
            "such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the "
            "response. Begin your evaluation by providing a short explanation. Be as objective as possible. "
            + _RATING_FORMAT
            + "\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
            "[The End of Assistant's Answer]",
        ),
        JudgeTemplate(
            "single-math-v1",
            "You are a helpful assistant.",
            "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided "
            "by an AI assistant to the user question displayed below. Your evaluation should consider "
            "correctness and helpfulness. You will be given a reference answer and the assistant's answer. "
            "Begin your evaluation by comparing the assistant's answer with the reference answer. Identify and "
            "correct any mistakes. Be as objective as possible. "
            + _RATING_FORMAT
            + "\n\n[Question]\n{question}"
            "\n\n[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference Answer]\n\n"
            "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
        ),
        JudgeTemplate(
            "single-v1-multi-turn",
            "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
            "assistant to the user question displayed below. Your evaluation should consider factors such as "
            "the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. You "
            "evaluation should focus on the assistant's answer to the second user question. Begin your "
            "evaluation by providing a short explanation. Be as objective as possible. "
            + _RATING_FORMAT
            + "\n\n",
            _CONVERSATION.format(who="A", slot=""),
        ),
        JudgeTemplate(
            "single-math-v1-multi-turn",
            "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
            "assistant to the user question. Your evaluation should consider correctness and helpfulness. You "
            "will be given a reference answer and the assistant's answer. You evaluation should focus on the "
            "assistant's answer to the second question. Begin your evaluation by comparing the assistant's "
            "answer with the reference answer. Identify and correct any mistakes. Be as objective as possible. "
            + _RATING_FORMAT
            + "\n\n",
            _REFERENCE_CONVERSATION + _CONVERSATION.format(who="A", slot=""),
        ),
    )
}


@dataclass(frozen=True)
class JudgePrompt:
    """The messages for one judge call, and the template they came from."""

    template: str
    messages: tuple[dict[str, str], ...]


def uses_reference(record: AnswerRecord, turn: int, reference_categories: tuple[str, ...]) -> bool:
    """Whether turn (1-based) is graded against the set's reference answers: a reference category with them."""
    if record.category not in reference_categories or record.reference is None:
        return False
    return all(record.reference[k] for k in range(turn))


def _messages(template: JudgeTemplate, **slots: str) -> JudgePrompt:
    return JudgePrompt(
        template.name,
        (
            {"role": "system", "content": template.system},
            {"role": "user", "content": template.user.format(**slots)},
        ),
    )


def _reference_slots(record: AnswerRecord, turn: int) -> dict[str, str]:
    assert record.reference is not None
    return {f"ref_answer_{k + 1}": record.reference[k] for k in range(turn)}


def single_prompt(record: AnswerRecord, turn: int, reference_categories: tuple[str, ...]) -> JudgePrompt:
    """Rate the answer of turn 1 or 2 (1-based); turn 2 is judged on the whole conversation."""
    if not 1 <= turn <= min(MAX_JUDGED_TURNS, len(record.turns)):
        raise ValueError(f"id {record.id}: no judge template for turn {turn} of {len(record.turns)}")
    with_reference = uses_reference(record, turn, reference_categories)
    slots = _reference_slots(record, turn) if with_reference else {}
    name = "single-math-v1" if with_reference else "single-v1"
    if turn == 1:
        return _messages(TEMPLATES[name], question=record.turns[0], answer=record.answers[0], **slots)
    return _messages(
        TEMPLATES[name + "-multi-turn"],
        question_1=record.turns[0],
        question_2=record.turns[1],
        answer_1=record.answers[0],
        answer_2=record.answers[1],
        **slots,
    )


def pairwise_prompt(
    first: AnswerRecord, second: AnswerRecord, turn: int, reference_categories: tuple[str, ...]
) -> JudgePrompt:
    """Compare first (shown as assistant A) with second (assistant B) on turn 1 or 2 of the same question.

    The questions and references are read from first; the caller asks both orders to cancel position bias."""
    if first.turns[:turn] != second.turns[:turn]:
        raise ValueError(f"id {first.id}: the two answer files asked different questions")
    if not 1 <= turn <= min(MAX_JUDGED_TURNS, len(first.turns)):
        raise ValueError(f"id {first.id}: no judge template for turn {turn} of {len(first.turns)}")
    with_reference = uses_reference(first, turn, reference_categories)
    slots = _reference_slots(first, turn) if with_reference else {}
    name = "pair-math-v1" if with_reference else "pair-v2"
    if turn == 1:
        return _messages(
            TEMPLATES[name],
            question=first.turns[0],
            answer_a=first.answers[0],
            answer_b=second.answers[0],
            **slots,
        )
    return _messages(
        TEMPLATES[name + "-multi-turn"],
        question_1=first.turns[0],
        question_2=first.turns[1],
        answer_a_1=first.answers[0],
        answer_a_2=first.answers[1],
        answer_b_1=second.answers[0],
        answer_b_2=second.answers[1],
        **slots,
    )


# --- the verdicts, read back ----------------------------------------------------------------------------------
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_LOOSE_RATING = re.compile(r"(?:\[\s*(\d+(?:\.\d+)?)\s*\]|[Rr]ating:\s*(\d+(?:\.\d+)?)\b)")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_rating(text: str) -> float | None:
    """The judge's 1-10 rating, or None. The last `[[n]]` wins: the verdict follows the explanation, which may quote
    the format's example. Only without any `[[n]]` is a `[n]` or `Rating: n` read; out of range is unparseable."""
    found = _RATING.findall(text)
    if not found:
        found = [single or after_colon for single, after_colon in _LOOSE_RATING.findall(text)]
    if not found:
        return None
    rating = float(found[-1])
    return rating if 1 <= rating <= 10 else None


def parse_verdict(text: str) -> str | None:
    """ "A", "B" or "C" (tie) from the last `[[X]]` of the reply, or None."""
    found = _VERDICT.findall(text)
    return found[-1] if found else None


def majority(verdicts: Sequence[str]) -> str | None:
    """The most frequent verdict; a tie between the most frequent ones is a tie ("C"); None without any."""
    counts = Counter(verdicts).most_common()
    if not counts:
        return None
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return "C"
    return counts[0][0]


def swap_outcome(model_first: str, model_second: str) -> tuple[str, bool]:
    """(win, loss or tie for the model, consistent?) from the verdict with the model as A and the one with it as B."""
    first = {"A": "win", "B": "loss", "C": "tie"}[model_first]
    second = {"A": "loss", "B": "win", "C": "tie"}[model_second]
    return (first, True) if first == second else ("tie", False)
