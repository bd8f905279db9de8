"""Prompt sets: every named set of ../shared/data/eval loads whole, user files of both formats, bad records named."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from shared_paths import DATA

from ift_dist.eval.prompt_sets import SET_NAMES, PromptSetError, data_root, load_prompt_set, set_label

EVAL_DATA = DATA / "eval"
COUNTS = {
    "mt_bench": 80,
    "vicuna_bench": 80,
    "self_instruct": 252,
    "alpaca_eval": 805,
    "arena_hard": 500,
    "alignbench": 683,
    "ifeval": 541,
}


@pytest.fixture(autouse=True)
def shared_data(monkeypatch):
    monkeypatch.setenv("IFT_EVAL_DATA", str(EVAL_DATA))


def test_every_named_set_is_listed():
    assert set(SET_NAMES) == set(COUNTS)


@pytest.mark.parametrize("name", list(COUNTS))
def test_named_set_loads_whole(name):
    prompts = load_prompt_set(name)
    assert len(prompts) == COUNTS[name]
    assert len({prompt.id for prompt in prompts}) == len(prompts)
    assert all(
        prompt.set == name and prompt.turns and all(turn.strip() for turn in prompt.turns)
        for prompt in prompts
    )
    assert [prompt.id for prompt in load_prompt_set(name, limit=3)] == [prompt.id for prompt in prompts[:3]]


def test_mt_bench_two_turns_and_gpt4_references():
    prompts = load_prompt_set("mt_bench")
    assert all(len(prompt.turns) == 2 for prompt in prompts)
    assert Counter(prompt.category for prompt in prompts) == {
        category: 10
        for category in (
            "writing",
            "roleplay",
            "reasoning",
            "math",
            "coding",
            "extraction",
            "stem",
            "humanities",
        )
    }
    referenced = [prompt for prompt in prompts if prompt.reference is not None]
    assert [prompt.id for prompt in referenced] == [str(number) for number in range(101, 131)]
    assert {prompt.category for prompt in referenced} == {"reasoning", "math", "coding"}
    assert all(len(prompt.reference) == 2 for prompt in referenced)
    first = prompts[0]
    assert first.id == "81" and first.turns[0].startswith("Compose an engaging travel blog post about")
    assert next(p for p in referenced if p.id == "101").reference[0].startswith("If you have just overtaken")


def test_set_specific_fields():
    self_instruct = load_prompt_set("self_instruct", limit=1)[0]
    assert self_instruct.id == "user_oriented_task_0" and self_instruct.category == "Grammarly"
    # instruction, a blank line, the instance's input: as AlpacaEval writes the same prompt
    assert self_instruct.turns[0].endswith("eliminate unnecessary words.\n\nIf you have any questions about my rate "
                                           "or if you find it necessary to increase or decrease the scope for this "
                                           "project, please let me know.")  # fmt: skip
    assert self_instruct.reference and self_instruct.reference[0]
    alpaca = load_prompt_set("alpaca_eval")
    assert alpaca[0].id == "0" and Counter(p.category for p in alpaca)["selfinstruct"] == 252
    arena = load_prompt_set("arena_hard", limit=1)[0]
    assert (
        arena.id == "328c149ed45a41c0b9d6f14659e63599" and arena.category == "ABC Sequence Puzzles & Groups"
    )
    assert arena.reference is None
    alignbench = load_prompt_set("alignbench", limit=1)[0]
    assert alignbench.category == "专业能力" and alignbench.reference[0].startswith("高音单簧管")
    ifeval = load_prompt_set("ifeval", limit=1)[0]
    assert ifeval.id == "1000" and ifeval.category is None
    assert (
        ifeval.extra["instruction_id_list"][0] == "punctuation:no_comma" and len(ifeval.extra["kwargs"]) == 3
    )


def test_data_dir_argument_and_environment(tmp_path, monkeypatch):
    (tmp_path / "vicuna_bench").mkdir()
    (tmp_path / "vicuna_bench" / "question.jsonl").write_text(
        json.dumps({"question_id": 7, "category": "generic", "turns": ["Hi?"]}) + "\n"
    )
    assert [p.id for p in load_prompt_set("vicuna_bench", data_dir=str(tmp_path))] == ["7"]
    monkeypatch.setenv("IFT_EVAL_DATA", str(tmp_path))
    assert data_root() == tmp_path and len(load_prompt_set("vicuna_bench")) == 1
    with pytest.raises(PromptSetError, match="not found"):
        load_prompt_set("mt_bench")


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_user_file_openai_messages(tmp_path):
    path = write_lines(
        tmp_path / "mine.jsonl",
        [
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                          {"role": "assistant", "content": "Goodbye!"}]},
            {"messages": [{"role": "user", "content": "Only a question"}], "id": "q2", "category": "misc"},
        ],
    )  # fmt: skip
    first, second = load_prompt_set(str(path))
    assert set_label(str(path)) == "mine" and first.set == "mine"
    assert (first.id, first.system, first.turns, first.reference) == ("0", "Be brief.", ["Hi", "Bye"],
                                                                       ["Hello!", "Goodbye!"])  # fmt: skip
    assert (second.id, second.category, second.turns, second.reference) == (
        "q2",
        "misc",
        ["Only a question"],
        None,
    )


def test_user_file_alpaca_jsonl_and_json_array(tmp_path):
    records = [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Name a colour.", "input": "", "output": ""},
    ]
    array = tmp_path / "a.json"
    array.write_text(json.dumps(records, indent=1))
    for path in (write_lines(tmp_path / "a.jsonl", records), array):
        first, second = load_prompt_set(str(path), limit=0)
        assert (first.turns, first.reference) == (["Translate to French.\n\ncat"], ["chat"])
        assert (second.id, second.turns, second.reference, second.system) == (
            "1",
            ["Name a colour."],
            None,
            None,
        )


@pytest.mark.parametrize(
    "bad, line, message",
    [
        ("{not json", 2, "not JSON"),
        ("[1, 2]", 2, "a record must be a JSON object"),
        ({"text": "hi"}, 2, "messages: missing"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, 2, "messages[0].role: expected 'user'"),
        ({"messages": [{"role": "user", "content": 3}]}, 2, "content: expected str, got int"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            },
            2,
            "assistant reply must follow every user turn",
        ),
        ({"messages": []}, 2, "messages: no user message"),
        ({"instruction": "   "}, 2, "instruction: empty"),
        ({"instruction": "ok", "id": "0"}, 2, "id: '0' repeats the id of"),
    ],
)
def test_bad_user_records_name_file_line_field(tmp_path, bad, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [{"instruction": "fine"}, bad])
    with pytest.raises(PromptSetError) as caught:
        load_prompt_set(str(path))
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert message in str(caught.value)


def test_damaged_named_set(tmp_path):
    (tmp_path / "mt_bench").mkdir()
    write_lines(
        tmp_path / "mt_bench" / "question.jsonl",
        [{"question_id": 81, "category": "writing", "turns": ["a", "b"]},
         {"question_id": 82, "category": "writing", "turns": "not a list"}],
    )  # fmt: skip
    with pytest.raises(PromptSetError, match=r"question\.jsonl:2: turns: expected list, got str"):
        load_prompt_set("mt_bench", data_dir=str(tmp_path))
    write_lines(
        tmp_path / "mt_bench" / "question.jsonl", [{"question_id": 81, "category": "writing", "turns": ["a"]}]
    )
    with pytest.raises(PromptSetError, match="reference answers not found"):
        load_prompt_set("mt_bench", data_dir=str(tmp_path))


def test_missing_user_file(tmp_path):
    with pytest.raises(PromptSetError, match="not found"):
        load_prompt_set(str(tmp_path / "absent.jsonl"))
