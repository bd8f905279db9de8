"""records.py: one record dict -> a validated Conversation, or a BadRecord with the exact reason and field."""

from __future__ import annotations

import json

import pytest

from ift_dist.config import ConfigError, SourceConfig, load_config
from ift_dist.data.contracts import BadRecord, Conversation, Message, SampleRef
from ift_dist.data.records import FILTERED, REASONS, convert_record, detect_format, to_conversation

REF = SampleRef("unit", 7)


def convert(record, fmt, **source_options):
    source = SourceConfig(path="unused.jsonl", **source_options)
    return to_conversation(record, fmt=fmt, source=source, ref=REF, file="f.jsonl", location="line 3")


def roles(conversation: Conversation) -> list[str]:
    return [message.role for message in conversation.messages]


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


WEATHER = {
    "name": "get_weather",
    "description": "Weather",
    "parameters": {"type": "object", "properties": {}},
}


# ------------------------------------------------------------------------------------------ formats


def test_detect_format_by_keys_after_column_mapping():
    assert detect_format({"messages": []}) == "openai"
    assert detect_format({"conversations": [], "id": "x"}) == "sharegpt"
    assert detect_format({"conversation": []}) == "firefly"
    assert detect_format({"instruction": "a", "input": "", "output": "b"}) == "alpaca"
    assert detect_format({"instruction": "a", "instances": []}) == "alpaca"
    assert detect_format({"prompt": "a", "completion": "b"}) is None
    assert detect_format({"prompt": "a", "completion": "b"}, {"instruction": "prompt"}) == "alpaca"
    assert detect_format({"dialog": []}, {"conversations": "dialog"}) == "sharegpt"
    assert detect_format([1, 2]) is None


def test_alpaca_joins_instruction_and_input_and_keeps_them_apart():
    record = {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief."}
    conversation = convert(record, "alpaca")
    assert conversation.messages == [
        Message("system", "Be brief."),
        Message("user", "Translate\n\nchat", alpaca=("Translate", "chat")),
        Message("assistant", "cat"),
    ]
    assert conversation.ref == REF and conversation.tools is None
    no_input = convert({"instruction": "Hi", "input": "  ", "output": "Hello"}, "alpaca")
    assert no_input.messages[0] == Message("user", "Hi", alpaca=("Hi", ""))
    assert convert({"instruction": "Hi", "output": "Hello"}, "alpaca").messages[0].content == "Hi"


def test_alpaca_history_comes_before_the_instruction():
    record = {"instruction": "And 3+3?", "output": "6", "history": [["1+1?", "2"], ["2+2?", "4"]]}
    conversation = convert(record, "alpaca")
    assert [(m.role, m.content) for m in conversation.messages] == [
        ("user", "1+1?"),
        ("assistant", "2"),
        ("user", "2+2?"),
        ("assistant", "4"),
        ("user", "And 3+3?"),
        ("assistant", "6"),
    ]


def test_self_instruct_uses_the_first_instance():
    record = {
        "instruction": "Antonym?",
        "instances": [{"input": "hot", "output": "cold"}, {"input": "up", "output": "down"}],
    }
    conversation = convert(record, "alpaca")
    assert conversation.messages[0].alpaca == ("Antonym?", "hot")
    assert conversation.messages[1].content == "cold"
    assert len(conversation.messages) == 2


def test_sharegpt_tool_turns_become_openai_tool_calls_and_tools_are_normalised():
    record = {
        "conversations": [
            human("Weather in Paris?"),
            {
                "from": "function_call",
                "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}),
            },
            {"from": "observation", "value": '{"temperature": 21}'},
            gpt("21 degrees."),
        ],
        "tools": json.dumps([WEATHER]),  # glaive: a JSON string of bare functions
    }
    conversation = convert(record, "sharegpt")
    assert roles(conversation) == ["user", "assistant", "tool", "assistant"]
    call = conversation.messages[1]
    assert call.content == ""
    assert call.tool_calls == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    assert conversation.tools == [{"type": "function", "function": WEATHER}]
    assert convert({**record, "tools": "[]"}, "sharegpt").tools is None


def test_function_call_right_after_a_reply_is_merged_into_it():
    record = {
        "conversations": [
            human("Weather?"),
            gpt("Let me check."),
            {"from": "function_call", "value": '[{"name": "a", "arguments": "{}"}, {"name": "b"}]'},
            {"from": "observation", "value": "1"},
            {"from": "observation", "value": "2"},
            gpt("Done."),
        ]
    }
    conversation = convert(record, "sharegpt")
    assert roles(conversation) == ["user", "assistant", "tool", "tool", "assistant"]
    assert conversation.messages[1].content == "Let me check."
    assert [call["function"] for call in conversation.messages[1].tool_calls] == [
        {"name": "a", "arguments": {}},
        {"name": "b", "arguments": {}},
    ]


def test_openai_content_parts_null_content_string_arguments_and_tool_names():
    record = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "content": "21", "name": "get_weather", "tool_call_id": "c1"},
            {"role": "assistant", "content": "21 degrees."},
        ],
        "tools": [{"type": "function", "function": WEATHER}],
        "label": True,
    }
    conversation = convert(record, "openai")
    assert conversation.messages[0].content == "Weather in Paris?"
    assert conversation.messages[1] == Message(
        "assistant",
        "",
        tool_calls=[
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    )
    assert conversation.messages[2] == Message("tool", "21", name="get_weather")
    assert conversation.tools == [{"type": "function", "function": WEATHER}]


def test_firefly():
    record = {"conversation": [{"human": "Hi", "assistant": "Hello"}, {"human": "2+2?", "assistant": "4"}]}
    conversation = convert(record, "firefly", system="Be terse.")
    assert [(m.role, m.content) for m in conversation.messages] == [
        ("system", "Be terse."),
        ("user", "Hi"),
        ("assistant", "Hello"),
        ("user", "2+2?"),
        ("assistant", "4"),
    ]


# ------------------------------------------------------------------------------------------ source options


def test_system_precedence_message_then_record_then_source():
    chat = [human("Hi"), gpt("Hello")]
    own = {"conversations": [{"from": "system", "value": "Own."}, *chat], "system": "Field."}
    assert convert(own, "sharegpt", system="Source.").messages[0].content == "Own."
    assert (
        convert({"conversations": chat, "system": "Field."}, "sharegpt", system="Source.").messages[0].content
        == "Field."
    )
    assert (
        convert({"conversations": chat, "system": " "}, "sharegpt", system="Source.").messages[0].content
        == "Source."
    )
    assert roles(convert({"conversations": chat}, "sharegpt")) == ["user", "assistant"]


def test_placeholders_fill_every_text_field_with_or_without_spaces():
    record = {
        "instruction": "Who is {{name}}?",
        "input": "{{ author }}",
        "output": "{{name}} by {{ author }}, not {{other}}",
    }
    conversation = convert(
        record, "alpaca", placeholders={"name": "Ada", "author": "Lab"}, system="I am {{name}}."
    )
    assert conversation.messages[0].content == "I am Ada."
    assert conversation.messages[1].alpaca == ("Who is Ada?", "Lab")
    assert conversation.messages[1].content == "Who is Ada?\n\nLab"
    assert conversation.messages[2].content == "Ada by Lab, not {{other}}"


def test_columns_rename_fields_at_every_level_and_errors_name_the_files_keys():
    columns = {"conversations": "dialog", "from": "speaker", "value": "text"}
    record = {"dialog": [{"speaker": "me", "text": "Hi"}, {"speaker": "bot", "text": "Hello"}]}
    conversation = convert(record, "sharegpt", columns=columns, roles={"me": "user", "bot": "assistant"})
    assert roles(conversation) == ["user", "assistant"]
    bad = convert(record, "sharegpt", columns=columns)
    assert (bad.reason, bad.field) == ("unknown_role", "dialog[0].speaker")
    assert "'me'" in bad.detail


def test_where_filters_without_calling_the_record_bad():
    record = {
        "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        "label": False,
    }
    assert isinstance(convert(record, "openai", where={"label": True}), BadRecord)
    assert convert(record, "openai", where={"label": True}).reason == FILTERED
    assert isinstance(convert(record, "openai", where={"label": False}), Conversation)
    missing = convert({"messages": record["messages"]}, "openai", where={"label": True})
    assert missing.reason == FILTERED


def test_trailing_turns_after_the_last_reply_are_trimmed_and_counted():
    record = {"conversations": [human("Hi"), gpt("Hello"), human("Bye"), human("Really bye")]}
    source = SourceConfig(path="x.jsonl")
    conversation, trimmed = convert_record(
        record, fmt="sharegpt", source=source, ref=REF, file="f", location="l"
    )
    assert roles(conversation) == ["user", "assistant"]
    assert trimmed == 2


def test_role_values_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.roles\.bot"):
        load_config(None, ["data.sources=[{path: a.jsonl, roles: {bot: robot}}]"])


# ------------------------------------------------------------------------------------------ bad records

SHAREGPT_BAD = [
    # (record, reason, field)
    ({"conversations": "Hi"}, "wrong_type", "conversations"),
    ({"id": 1}, "missing_field", "conversations"),
    ({"conversations": ["Hi"]}, "wrong_type", "conversations[0]"),
    ({"conversations": [{"from": 1, "value": "Hi"}, gpt("ok")]}, "wrong_type", "conversations[0].from"),
    ({"conversations": [human({"text": "Hi"}), gpt("ok")]}, "wrong_type", "conversations[0].value"),
    ({"conversations": [human("Hi"), {"from": "gpt"}]}, "missing_field", "conversations[1].value"),
    (
        {"conversations": [human("Hi"), {"from": "bot", "value": "ok"}]},
        "unknown_role",
        "conversations[1].from",
    ),
    ({"conversations": [{"from": "system", "value": "S"}, human("Hi")]}, "no_assistant", "conversations"),
    ({"conversations": []}, "no_assistant", "conversations"),
    ({"conversations": [human("Hi"), gpt(" \n\t")]}, "empty_assistant", "conversations[1].value"),
    # A prompt that says nothing: every user message empty or whitespace (trimmed trailing turns do not count).
    ({"conversations": [human(""), gpt("ok")]}, "empty_prompt", "conversations[0].value"),
    (
        {"conversations": [human(" "), gpt("a"), human("\n\t"), gpt("b")]},
        "empty_prompt",
        "conversations[0].value",
    ),
    ({"conversations": [human(""), gpt("a"), human("Later")]}, "empty_prompt", "conversations[0].value"),
    ({"conversations": [gpt("First"), human("Hi"), gpt("ok")]}, "role_order", "conversations[0].from"),
    ({"conversations": [human("Hi"), human("Again"), gpt("ok")]}, "role_order", "conversations[1].from"),
    ({"conversations": [human("Hi"), gpt("a"), gpt("b")]}, "role_order", "conversations[2].from"),
    (
        {"conversations": [human("Hi"), {"from": "system", "value": "S"}, gpt("ok")]},
        "role_order",
        "conversations[1].from",
    ),
    (
        {"conversations": [human("Hi"), gpt("a"), {"from": "observation", "value": "1"}, gpt("b")]},
        "role_order",
        "conversations[2].from",
    ),
    ({"conversations": [human("Hi"), gpt("ok")], "tools": "{broken"}, "invalid_tools", "tools"),
    ({"conversations": [human("Hi"), gpt("ok")], "tools": 5}, "invalid_tools", "tools"),
    (
        {"conversations": [human("Hi"), gpt("ok")], "tools": [{"description": "x"}]},
        "invalid_tools",
        "tools[0].name",
    ),
    (
        {
            "conversations": [human("Hi"), gpt("ok")],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}],
        },
        "invalid_tools",
        "tools[0].function.parameters",
    ),
    (
        {"conversations": [human("Hi"), {"from": "function_call", "value": '{"name": "f", "arguments": '}]},
        "invalid_tool_call",
        "conversations[1].value",
    ),
    (
        {"conversations": [human("Hi"), {"from": "function_call", "value": '{"arguments": {}}'}]},
        "invalid_tool_call",
        "conversations[1].value.name",
    ),
    (
        {
            "conversations": [
                human("Hi"),
                {"from": "function_call", "value": '{"name": "f", "arguments": "[1]"}'},
            ]
        },
        "invalid_tool_call",
        "conversations[1].value.arguments",
    ),
    ({"conversations": [human("caf\udce9"), gpt("ok")]}, "non_utf8", "conversations[0].value"),
    ({"conversations": [human("Hi"), gpt("ok")], "system": "\ud800"}, "non_utf8", "system"),
]


@pytest.mark.parametrize(("record", "reason", "field"), SHAREGPT_BAD)
def test_sharegpt_bad_records(record, reason, field):
    bad = convert(record, "sharegpt")
    assert isinstance(bad, BadRecord), bad
    assert (bad.reason, bad.field, bad.file, bad.location) == (reason, field, "f.jsonl", "line 3")
    assert bad.reason in REASONS
    assert bad.detail and str(bad).endswith(f"[{reason}]")


OTHER_BAD = [
    # (record, format, reason, field)
    (["not", "a", "dict"], "alpaca", "wrong_type", None),
    ({"input": "x", "output": "y"}, "alpaca", "missing_field", "instruction"),
    ({"instruction": "x"}, "alpaca", "missing_field", "output"),
    ({"instruction": "x", "output": ""}, "alpaca", "empty_assistant", "output"),
    ({"instruction": "x", "output": 3}, "alpaca", "wrong_type", "output"),
    ({"instruction": "", "input": "", "output": "y"}, "alpaca", "empty_prompt", "instruction"),
    ({"instruction": " \n", "input": "\t", "output": "y"}, "alpaca", "empty_prompt", "instruction"),
    ({"instruction": "", "output": "y"}, "alpaca", "empty_prompt", "instruction"),
    (
        {"instruction": "", "instances": [{"input": " ", "output": "y"}]},
        "alpaca",
        "empty_prompt",
        "instruction",
    ),
    (
        {"conversation": [{"human": " ", "assistant": "x"}]},
        "firefly",
        "empty_prompt",
        "conversation[0].human",
    ),
    (
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": " "}]},
                {"role": "assistant", "content": "x"},
            ]
        },
        "openai",
        "empty_prompt",
        "messages[1].content",
    ),
    ({"instruction": "x", "output": "y", "history": [["only one"]]}, "alpaca", "wrong_type", "history[0]"),
    (
        {"instruction": "x", "output": "y", "history": [["q", ""]]},
        "alpaca",
        "empty_assistant",
        "history[0][1]",
    ),
    ({"instruction": "x", "instances": []}, "alpaca", "wrong_type", "instances"),
    ({"instruction": "x", "instances": [{"input": "i"}]}, "alpaca", "missing_field", "instances[0].output"),
    ({"conversation": [{"human": "Hi"}]}, "firefly", "missing_field", "conversation[0].assistant"),
    (
        {"conversation": [{"human": "Hi", "assistant": ""}]},
        "firefly",
        "empty_assistant",
        "conversation[0].assistant",
    ),
    (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]},
        "openai",
        "missing_field",
        "messages[1].content",
    ),
    (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "x"}]},
        "openai",
        "unknown_role",
        "messages[1].role",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                {"role": "assistant", "content": "x"},
            ]
        },
        "openai",
        "wrong_type",
        "messages[0].content[0]",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": None, "tool_calls": "f()"},
            ]
        },
        "openai",
        "invalid_tool_call",
        "messages[1].tool_calls",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "Hi", "tool_calls": [{"name": "f"}]},
                {"role": "assistant", "content": "x"},
            ]
        },
        "openai",
        "invalid_tool_call",
        "messages[0].tool_calls",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": "{'a': 1}"}}],
                },
            ]
        },
        "openai",
        "invalid_tool_call",
        "messages[1].tool_calls[0].arguments",
    ),
    (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]},
        "openai",
        "missing_field",
        "messages[1].content",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "tool", "content": "1"},
                {"role": "assistant", "content": "x"},
            ]
        },
        "openai",
        "role_order",
        "messages[1].role",
    ),
    ({"text": " \n"}, "text", "empty_text", "text"),
]


@pytest.mark.parametrize(("record", "fmt", "reason", "field"), OTHER_BAD)
def test_other_format_bad_records(record, fmt, reason, field):
    bad = convert(record, fmt)
    assert isinstance(bad, BadRecord), bad
    assert (bad.reason, bad.field) == (reason, field)


def test_every_reason_is_exercised():
    seen = {reason for _, reason, _ in SHAREGPT_BAD} | {reason for *_, reason, _ in OTHER_BAD}
    # invalid_json and non_utf8 bytes come from files; test_sources covers them.
    assert seen | {"invalid_json"} == set(REASONS)


def test_allowed_orders_pass():
    after_tool = {
        "conversations": [
            human("Hi"),
            {"from": "function_call", "value": '{"name": "f"}'},
            {"from": "observation", "value": "1"},
            human("And?"),
            gpt("ok"),
        ]
    }
    assert roles(convert(after_tool, "sharegpt")) == ["user", "assistant", "tool", "user", "assistant"]
    one_empty_user = {"conversations": [human("Hi"), gpt("a"), human(" "), gpt("b")]}
    assert roles(convert(one_empty_user, "sharegpt")) == ["user", "assistant", "user", "assistant"]
    input_only = convert({"instruction": "", "input": "Translate: chat", "output": "cat"}, "alpaca")
    assert input_only.messages[0].content == "Translate: chat"
    empty_tool_result = {
        "conversations": [
            human("Hi"),
            {"from": "function_call", "value": '{"name": "f"}'},
            {"from": "observation", "value": ""},
            gpt("ok"),
        ]
    }
    assert roles(convert(empty_tool_result, "sharegpt")) == ["user", "assistant", "tool", "assistant"]
    ends_with_call = {
        "conversations": [human("Hi"), {"from": "function_call", "value": '{"name": "f", "arguments": {}}'}]
    }
    assert convert(ends_with_call, "sharegpt").messages[-1].tool_calls[0]["function"]["name"] == "f"


def test_unknown_format_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown record format"):
        convert({}, "csv")


def test_an_empty_prompt_in_a_file_is_named_by_file_and_line(tmp_path):
    from ift_dist.data.sources import open_source

    path = tmp_path / "alpaca.jsonl"
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "", "input": "", "output": "An answer to nothing."},
        {"instruction": "", "input": "Translate: chat", "output": "cat"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    scan = open_source(SourceConfig(path=str(path))).scan()
    assert scan.valid_indices.tolist() == [0, 2]
    (bad,) = scan.bad
    assert (
        str(bad)
        == f"{path}, line 2, field instruction: the instruction and the input are empty [empty_prompt]"
    )
