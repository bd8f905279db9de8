r"""A Question and its few-shot examples -> the McPrompt scored for it (plain text or the chat template).

Plain text is exactly the context lm-evaluation-harness (0.4) builds for the same document, so scores compare
with published numbers (tests/unit/test_eval_prompts.py proves it against lm-eval's own task machinery):

    description + shot_1 + " " + answer_1 + "\n\n" + ... + shot_k + " " + answer_k + "\n\n" + question

with each continuation " " + answer (lm-eval's target_delimiter " ", fewshot_delimiter "\n\n"). Per layout:

    scoring      layout  lm-eval task                 document text                               answer
    letter       mmlu    mmlu_<subject>               {q}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:   letter
    letter       ceval   ceval-valid_<subject>        {q}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n答案：    letter
    letter       cmmlu   cmmlu_<subject>              (as ceval)                                  letter
    option_text  mmlu    mmlu_<subject>_continuation  Question: {q}\nAnswer:                      option text
    option_text  ceval   (none: ours)                 问题：{q}\n答案：                             option text
    option_text  cmmlu   (none: ours)                 问题：{q}\n答案：                             option text

{q} is the question with surrounding whitespace stripped (lm-eval's question.strip()); options are used as
they are. lm-eval has no continuation variant for C-Eval or CMMLU: ours mirrors mmlu_continuation, with the
letter task's description made option-free ("单项选择题" -> "问题", "选项" dropped) and the labels 问题：/答案：.

Chat format: every few-shot example becomes a user turn (its document text) and an assistant turn (its
answer), the question a final user turn. The description opens the first user turn, not a system turn: some
templates drop system turns (Phi-3's), and SmolLM2's and Qwen2.5's put their default system prompt in front as
in any chat. The context is the tokenizer's chat template with the generation prompt; the continuations are
the answers without a leading space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ift_dist.config.choices import McScoring, PromptFormat
from ift_dist.eval.benchmarks import Benchmark
from ift_dist.eval.records import LETTERS, McPrompt, Question

# lm-eval's target_delimiter (between a document and its answer) and fewshot_delimiter (between examples).
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"

# The task description that opens a prompt, per layout and scoring; {name} is the Subject's name. The letter
# ones and mmlu's option_text one are lm-eval's, word for word.
DESCRIPTIONS = {
    "mmlu": {
        McScoring.letter: "The following are multiple choice questions (with answers) about {name}.\n\n",
        McScoring.option_text: "The following are questions (with answers) about {name}.\n\n",
    },
    "ceval": {
        McScoring.letter: "以下是中国关于{name}的单项选择题，请选出其中的正确答案。\n\n",
        McScoring.option_text: "以下是中国关于{name}的问题，请给出正确答案。\n\n",
    },
    "cmmlu": {
        McScoring.letter: "以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n",
        McScoring.option_text: "以下是关于{name}的问题，请直接给出正确答案。\n\n",
    },
}
# The cue the answer follows, and the label before an option_text question, per language.
ANSWER_CUES = {"en": "Answer:", "zh": "答案："}
QUESTION_LABELS = {"en": "Question: ", "zh": "问题："}


def build_prompt(
    question: Question,
    shots: Sequence[Question],
    benchmark: Benchmark,
    scoring: McScoring,
    format: PromptFormat,
    tokenizer: Any = None,
) -> McPrompt:
    """The context and the continuations scored for `question`, after `shots` (examples of its subject)."""
    for shot in shots:
        if shot.subject != question.subject:
            raise ValueError(f"few-shot example {shot.id} is not of the subject of {question.id}")
    description = describe(benchmark, question.subject, scoring)
    answers = tuple(answer_texts(question, scoring))
    if format == PromptFormat.plain:
        examples = [
            document_text(shot, benchmark, scoring)
            + TARGET_DELIMITER
            + answer_texts(shot, scoring)[shot.answer]
            for shot in shots
        ]
        context = description + "".join(example + FEWSHOT_DELIMITER for example in examples)
        context += document_text(question, benchmark, scoring)
        return McPrompt(context, tuple(TARGET_DELIMITER + answer for answer in answers))
    if format == PromptFormat.chat:
        messages = chat_messages(question, shots, benchmark, scoring)
        return McPrompt(_apply_chat_template(tokenizer, messages), answers)
    raise ValueError(f"unknown prompt format {format!r}; one of {', '.join(PromptFormat.values())}")


def describe(benchmark: Benchmark, subject: str, scoring: McScoring) -> str:
    """The task description for a subject, ending in a blank line."""
    return DESCRIPTIONS[benchmark.layout][McScoring(scoring)].format(name=benchmark.subjects[subject].name)


def document_text(question: Question, benchmark: Benchmark, scoring: McScoring) -> str:
    """lm-eval's doc_to_text: the question (with lettered options for letter scoring), then the answer cue."""
    cue = ANSWER_CUES[benchmark.language]
    if scoring == McScoring.letter:
        options = "".join(
            f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices, strict=True)
        )
        return f"{question.question.strip()}{options}\n{cue}"
    return f"{QUESTION_LABELS[benchmark.language]}{question.question.strip()}\n{cue}"


def answer_texts(question: Question, scoring: McScoring) -> list[str]:
    """What each option is scored as, without a delimiter: its letter, or its text."""
    return list(LETTERS[: len(question.choices)]) if scoring == McScoring.letter else list(question.choices)


def chat_messages(
    question: Question, shots: Sequence[Question], benchmark: Benchmark, scoring: McScoring
) -> list[dict[str, str]]:
    """The chat turns: a user and an assistant turn per few-shot example, then the question; the description
    opens the first user turn."""
    messages = []
    for shot in shots:
        messages.append({"role": "user", "content": document_text(shot, benchmark, scoring)})
        messages.append({"role": "assistant", "content": answer_texts(shot, scoring)[shot.answer]})
    messages.append({"role": "user", "content": document_text(question, benchmark, scoring)})
    messages[0]["content"] = describe(benchmark, question.subject, scoring) + messages[0]["content"]
    return messages


def _apply_chat_template(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ValueError(
            f"prompt format chat needs a tokenizer with a chat template; {name} has none "
            "(use the plain format)"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
