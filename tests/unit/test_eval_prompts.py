"""Prompts: our plain contexts and continuations equal lm-evaluation-harness's own for the same documents
(its task YAMLs and ConfigurableTask, fed our local CSVs through Hugging Face's csv loader), and the chat
format's turns."""

from __future__ import annotations

from pathlib import Path

import pytest

from ift_dist.config.choices import McScoring, PromptFormat
from ift_dist.eval.benchmarks import load_questions, load_shots, open_benchmark
from ift_dist.eval.prompts import build_prompt, describe
from ift_dist.eval.records import McPrompt

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"
TOKENIZERS = Path(__file__).resolve().parents[2].parent / "shared" / "tokenizers"

# Subjects with tricky text: MMLU options that read "None" (college_computer_science, college_physics), quoted
# multi-line questions in CRLF files (nutrition, high_school_physics), options with surrounding spaces and
# numbers (elementary_mathematics), C-Eval cells with embedded CRLF (advanced_mathematics,
# high_school_biology) and LF (high_school_politics, college_programming), CMMLU questions with surrounding
# spaces (machine_learning) and numeric options (college_actuarial_science).
SUBJECTS = {
    "mmlu": [
        "college_computer_science",
        "college_physics",
        "nutrition",
        "high_school_physics",
        "elementary_mathematics",
    ],
    "ceval": ["advanced_mathematics", "high_school_biology", "high_school_politics", "college_programming"],
    "cmmlu": ["machine_learning", "college_actuarial_science", "elementary_mathematics"],
}
FEWSHOT_QUESTIONS = 20
# How each benchmark's CSV columns are named, per split, and whether the file has a header row to skip.
COLUMNS = {
    "mmlu": {
        "test": ["question", "A", "B", "C", "D", "answer"],
        "dev": ["question", "A", "B", "C", "D", "answer"],
    },
    "ceval": {
        "val": ["id", "question", "A", "B", "C", "D", "answer"],
        "dev": ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
    },
    "cmmlu": {
        "test": ["index", "Question", "A", "B", "C", "D", "Answer"],
        "dev": ["index", "Question", "A", "B", "C", "D", "Answer"],
    },
}


def lm_eval_task_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def lm_eval_yaml(benchmark: str, subject: str, scoring: McScoring) -> Path:
    tasks = lm_eval_task_dir()
    if benchmark == "mmlu":
        variant = "default" if scoring == McScoring.letter else "continuation"
        return tasks / "mmlu" / variant / f"mmlu_{subject}.yaml"
    if benchmark == "ceval":
        return tasks / "ceval" / f"ceval-valid_{subject}.yaml"
    return tasks / "cmmlu" / f"cmmlu_{subject}.yaml"


def local_dataset(benchmark: str, subject: str):
    """A DatasetDict of the eval and dev splits from our CSV files, as the Hub copy lm-eval downloads would
    be: every cell a string (pandas would turn "None" into NaN and "0.50" into 0.5), MMLU in cais/mmlu's
    schema."""
    import datasets

    opened = open_benchmark(benchmark, str(DATA))
    splits = {}
    for split, columns in COLUMNS[benchmark].items():
        splits[split] = datasets.load_dataset(
            "csv",
            data_files=str(opened.subject_file(subject, split)),
            split="train",
            column_names=columns,
            header=None if benchmark == "mmlu" else 0,
            keep_default_na=False,
            features=datasets.Features({column: datasets.Value("string") for column in columns}),
        )
    if benchmark == "mmlu":
        # cais/mmlu: question, subject, choices (a list), answer (the index of the gold option).
        for split, dataset in splits.items():
            splits[split] = dataset.map(
                lambda row: {
                    "subject": subject,
                    "choices": [row["A"], row["B"], row["C"], row["D"]],
                    "answer": "ABCD".index(row["answer"]),
                },
                remove_columns=["A", "B", "C", "D", "answer"],
            )
    return datasets.DatasetDict(splits)


def lm_eval_task(benchmark: str, subject: str, scoring: McScoring, overrides: dict | None = None):
    """lm-eval's own task for a subject (its YAML, includes resolved), reading our local files."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(lm_eval_yaml(benchmark, subject, scoring))
    dataset = local_dataset(benchmark, subject)
    # custom_dataset replaces the Hub download; everything else (templates, sampler, delimiters) is lm-eval's.
    config["custom_dataset"] = lambda **metadata: dataset
    config.update(overrides or {})
    return ConfigurableTask(config=config)


def lm_eval_requests(task, num_fewshot: int, limit: int | None = None) -> list[McPrompt]:
    """lm-eval's loglikelihood requests for the first `limit` documents (None = all), as McPrompts."""
    task.set_config("num_fewshot", num_fewshot)
    task.build_all_requests(rank=0, world_size=1, limit=limit)
    by_document: dict[int, list] = {}
    for instance in task.instances:
        by_document.setdefault(instance.doc_id, []).append(instance.args)
    prompts = []
    for doc_id in sorted(by_document):
        contexts = {context for context, _ in by_document[doc_id]}
        assert len(contexts) == 1
        prompts.append(
            McPrompt(contexts.pop(), tuple(continuation for _, continuation in by_document[doc_id]))
        )
    return prompts


def our_prompts(
    benchmark_name: str, subject: str, scoring: McScoring, num_fewshot: int, limit: int | None = None
) -> list[McPrompt]:
    benchmark = open_benchmark(benchmark_name, str(DATA))
    shots = load_shots(benchmark, subject, num_fewshot)
    return [
        build_prompt(question, shots, benchmark, scoring, PromptFormat.plain)
        for question in load_questions(benchmark, subjects=[subject], limit=limit or 0)
    ]


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    datasets.disable_progress_bars()


CASES = [
    ("mmlu", McScoring.letter),
    ("mmlu", McScoring.option_text),
    ("ceval", McScoring.letter),
    ("cmmlu", McScoring.letter),
]


@pytest.mark.parametrize(
    ("benchmark", "scoring"), CASES, ids=[f"{name}-{scoring}" for name, scoring in CASES]
)
def test_plain_prompts_equal_lm_eval(benchmark, scoring, offline_datasets):
    for subject in SUBJECTS[benchmark]:
        task = lm_eval_task(benchmark, subject, scoring)
        # 0-shot: every question of the subject. 5-shot adds the same five examples in front of each question,
        # so the first questions suffice (lm-eval renders its templates afresh for every example: ~10 ms a
        # question).
        for num_fewshot, limit in ((0, None), (5, FEWSHOT_QUESTIONS)):
            theirs = lm_eval_requests(task, num_fewshot, limit)
            ours = our_prompts(benchmark, subject, scoring, num_fewshot, limit)
            assert len(ours) == len(theirs) > 0
            for index, (our, their) in enumerate(zip(ours, theirs, strict=True)):
                assert our == their, f"{benchmark} {subject} row {index}, {num_fewshot}-shot"


@pytest.mark.parametrize("benchmark", ["ceval", "cmmlu"])
def test_chinese_option_text_is_lm_eval_with_our_wording(benchmark, offline_datasets):
    """lm-eval has no continuation task for C-Eval or CMMLU: ours is its letter task with the documented
    wording swapped in (ift_dist/eval/prompts.py), so lm-eval given that config builds the same requests."""
    question_field = "question" if benchmark == "ceval" else "Question"
    subject = SUBJECTS[benchmark][0]
    opened = open_benchmark(benchmark, str(DATA))
    overrides = {
        "description": describe(opened, subject, McScoring.option_text),
        "doc_to_text": f"问题：{{{{{question_field}.strip()}}}}\n答案：",
        "doc_to_choice": "{{[A, B, C, D]}}",
    }
    task = lm_eval_task(benchmark, subject, McScoring.letter, overrides)
    for num_fewshot in (0, 5):
        assert our_prompts(benchmark, subject, McScoring.option_text, num_fewshot) == lm_eval_requests(
            task, num_fewshot
        )
    assert overrides["description"].startswith("以下是") and "单项选择题" not in overrides["description"]


def test_descriptions_equal_lm_eval_for_every_subject():
    """Every subject's name in our mapping.json gives lm-eval's description for its task."""
    from lm_eval.tasks._yaml_loader import load_yaml

    checked = 0
    for benchmark_name, scoring in CASES:
        benchmark = open_benchmark(benchmark_name, str(DATA))
        for subject in benchmark.subjects:
            config = load_yaml(lm_eval_yaml(benchmark_name, subject, scoring), resolve_func=False)
            assert describe(benchmark, subject, scoring) == config["description"], (benchmark_name, subject)
            checked += 1
    assert checked == 57 * 2 + 52 + 67


def test_plain_prompt_spelled_out():
    """The assembly written out by hand for one MMLU question with one shot: what lm-eval's docs describe."""
    benchmark = open_benchmark("mmlu", str(DATA))
    question = load_questions(benchmark, subjects=["abstract_algebra"], limit=1)[0]
    shot = load_shots(benchmark, "abstract_algebra", 1)[0]
    prompt = build_prompt(question, [shot], benchmark, McScoring.letter, PromptFormat.plain)

    def text(item):
        return item.question.strip() + "".join(
            f"\n{letter}. {choice}" for letter, choice in zip("ABCD", item.choices, strict=True)
        )

    assert prompt.context == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        f"{text(shot)}\nAnswer: {shot.gold}\n\n{text(question)}\nAnswer:"
    )
    assert prompt.continuations == (" A", " B", " C", " D")
    continuation = build_prompt(question, [shot], benchmark, McScoring.option_text, PromptFormat.plain)
    assert continuation.context == (
        "The following are questions (with answers) about abstract algebra.\n\n"
        f"Question: {shot.question.strip()}\nAnswer: {shot.choices[shot.answer]}\n\n"
        f"Question: {question.question.strip()}\nAnswer:"
    )
    assert continuation.continuations == tuple(" " + choice for choice in question.choices)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


@pytest.mark.parametrize("tokenizer_name", ["smollm2-135m-instruct", "qwen2.5-instruct"])
@pytest.mark.parametrize("scoring", [McScoring.letter, McScoring.option_text])
def test_chat_prompt_turns(tokenizer_name, scoring):
    tokenizer = load_tokenizer(tokenizer_name)
    benchmark = open_benchmark("ceval", str(DATA))
    question = load_questions(benchmark, subjects=["computer_network"], limit=1)[0]
    shots = load_shots(benchmark, "computer_network", 2)
    prompt = build_prompt(question, shots, benchmark, scoring, PromptFormat.chat, tokenizer)
    plain = build_prompt(question, shots, benchmark, scoring, PromptFormat.plain)

    # The plain prompt's pieces become turns: description + shot, answer, shot, answer, question.
    description = describe(benchmark, "computer_network", scoring)
    pieces = plain.context.removeprefix(description).split("\n\n")
    assert len(pieces) == 3
    answers = [shot.gold if scoring == McScoring.letter else shot.choices[shot.answer] for shot in shots]
    expected_messages = [
        {"role": "user", "content": description + pieces[0].removesuffix(" " + answers[0])},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": pieces[1].removesuffix(" " + answers[1])},
        {"role": "assistant", "content": answers[1]},
        {"role": "user", "content": pieces[2]},
    ]
    assert expected_messages[-1]["content"].endswith("答案：")
    assert prompt.context == tokenizer.apply_chat_template(
        expected_messages, tokenize=False, add_generation_prompt=True
    )
    # Both templates are ChatML: each answer is an assistant turn, and the context ends in the generation
    # prompt.
    for shot_text, answer in zip(pieces[:2], answers, strict=True):
        assert (
            f"{shot_text.removesuffix(' ' + answer)}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>"
            in (prompt.context)
        )
    assert prompt.context.endswith(f"{pieces[2]}<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.context.count(description) == 1
    assert prompt.context.index(description) < prompt.context.index(pieces[0][:20])
    expected = ("A", "B", "C", "D") if scoring == McScoring.letter else question.choices
    assert prompt.continuations == expected


def test_chat_prompt_zero_shot_puts_description_in_the_question_turn():
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    benchmark = open_benchmark("mmlu", str(DATA))
    question = load_questions(benchmark, subjects=["anatomy"], limit=1)[0]
    prompt = build_prompt(question, [], benchmark, McScoring.letter, PromptFormat.chat, tokenizer)
    plain = build_prompt(question, [], benchmark, McScoring.letter, PromptFormat.plain)
    assert prompt.context == tokenizer.apply_chat_template(
        [{"role": "user", "content": plain.context}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.context.count("<|im_start|>user\n") == 1
    assert prompt.continuations == ("A", "B", "C", "D")


def test_chat_format_needs_a_chat_template():
    benchmark = open_benchmark("mmlu", str(DATA))
    question = load_questions(benchmark, subjects=["anatomy"], limit=1)[0]
    with pytest.raises(ValueError, match="chat template"):
        build_prompt(question, [], benchmark, McScoring.letter, PromptFormat.chat, None)
    with pytest.raises(ValueError, match=r"chat template.*gpt2"):
        build_prompt(question, [], benchmark, McScoring.letter, PromptFormat.chat, load_tokenizer("gpt2"))


def test_shots_of_another_subject_are_refused():
    benchmark = open_benchmark("mmlu", str(DATA))
    question = load_questions(benchmark, subjects=["anatomy"], limit=1)[0]
    with pytest.raises(ValueError, match="not of the subject"):
        build_prompt(
            question, load_shots(benchmark, "astronomy", 1), benchmark, McScoring.letter, PromptFormat.plain
        )
