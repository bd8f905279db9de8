"""Turns one file record (Alpaca, ShareGPT, OpenAI, Firefly or text form) into a validated record or a BadRecord.

Formats (our field names; `SourceConfig.columns` maps them to the file's names at every level):
- alpaca: `instruction`, `input` ("" = none), `output`, `system`?, `history`? [[prompt, answer], ...] of earlier
  exchanges. Self-Instruct records (`instances` [{input, output}] instead of `output`) use their first instance.
- sharegpt: `conversations` [{from, value}], `system`?.  openai: `messages` [{role, content, tool_calls?, name?}].
- firefly: `conversation` [{human, assistant}], `system`?.  Any format may carry `tools`; other keys are ignored.
- text: `text`, a plain document (a TextDocument, not a Conversation); empty or whitespace-only is `empty_text`.
  Never detected (`detect_format`): a row holding only "text" may as well be a broken Alpaca record.

Rules the formats leave open, decided here:
- `null` (and a None filled in by an Arrow schema union) is a missing field. `where` compares top-level fields by
  the file's own names; a record it leaves out comes back with reason FILTERED (counted apart, not bad).
- Role values: BUILTIN_ROLES plus `SourceConfig.roles`, shared by ShareGPT and OpenAI records.
- A `function_call` turn (a JSON object {"name", "arguments"} or a list of them) becomes an assistant message with
  empty content and `tool_calls`; right after another assistant message it is merged into that one (a reply that
  then calls a tool). String arguments are parsed and must be a JSON object. A tool call keeps its `id`; a tool
  result's `tool_call_id` is dropped. Content parts (OpenAI) must be text; they are concatenated with no separator.
- System text: the conversation's own first message, else the record's `system`, else `SourceConfig.system`;
  empty or whitespace-only counts as none. Alpaca: a whitespace-only input is empty.
- An empty assistant reply without tool calls is `empty_assistant`; user messages that are all empty (Alpaca: the
  instruction and the input) are `empty_prompt`. Empty tool results and one empty user message among others pass.
- Messages after the last assistant reply are trimmed first (`convert_record` returns how many); then the order
  rules: system only first; the first other message is the user's; an assistant reply follows a user or tool
  message; a tool result follows an assistant message with tool calls or another tool result; no two user
  messages in a row. A user message right after a tool result is allowed.
- Placeholders (`{{name}}`, `{{ name }}`) are filled in message contents, the Alpaca pair and system texts; ones
  without a value stay. Text with lone surrogates (non-UTF-8 bytes decoded with errors="surrogateescape", or a
  JSON "\\udXXX" escape) is `non_utf8`: it cannot be tokenized.
- Fields name the file's own keys, e.g. "conversations[3].from" or "messages[0].content".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from typing import Any

from ift_dist.config import RecordFormat, SourceConfig
from ift_dist.data.contracts import BadRecord, Conversation, Message, SampleRef, TextDocument
from ift_dist.data.rejects import Reject, check_utf8, fail, type_name

# The formats a file's records can be in (data.sources[].format names them, or "auto" to detect one per file).
FORMATS = tuple(fmt.value for fmt in RecordFormat if fmt is not RecordFormat.auto)

# Reason of a record that `SourceConfig.where` leaves out: counted apart, never reported as bad.
FILTERED = "filtered"

REASONS = ("invalid_json", "non_utf8", "wrong_type", "missing_field", "unknown_role", "no_assistant")
REASONS += ("empty_assistant", "empty_prompt", "role_order", "invalid_tools", "invalid_tool_call")
REASONS += ("empty_text",)  # format text

# The file's role value -> ours. "function_call" is a tool call written as its own turn (ShareGPT / glaive);
# "function" is OpenAI's legacy role of a function result.
BUILTIN_ROLES = {
    **dict.fromkeys(("human", "user"), "user"),
    **dict.fromkeys(("gpt", "assistant", "chatgpt", "bard", "bing", "model"), "assistant"),
    **dict.fromkeys(("observation", "tool", "function"), "tool"),
    "system": "system",
    "function_call": "function_call",
}


@dataclass
class _Context:
    """What the adapters need from the source config: key and role names, placeholder substitution."""

    keys: dict[str, str]  # our name -> the file's name
    roles: dict[str, str]  # the file's role value -> ours
    placeholders: dict[str, str]
    pattern: re.Pattern | None

    @classmethod
    def of(cls, source: SourceConfig) -> _Context:
        pattern = None
        if source.placeholders:
            names = "|".join(re.escape(name) for name in source.placeholders)
            pattern = re.compile(r"\{\{\s*(" + names + r")\s*\}\}")
        roles = {**BUILTIN_ROLES, **source.roles}
        return cls(dict(source.columns), roles, dict(source.placeholders), pattern)

    def key(self, ours: str) -> str:
        return self.keys.get(ours, ours)

    def field(self, container: dict, ours: str, prefix: str = "") -> tuple[Any, str]:
        """The value of one of our fields (None when missing) and its dotted path in the file."""
        key = self.key(ours)
        return container.get(key), f"{prefix}.{key}" if prefix else key

    def text(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            fail("wrong_type", path, f"expected a string, got {type_name(value)}")
        check_utf8(value, path)
        if self.pattern is not None:
            value = self.pattern.sub(lambda match: self.placeholders[match.group(1)], value)
        return value

    def text_field(
        self, container: dict, ours: str, prefix: str = "", required: bool = True
    ) -> tuple[Any, str]:
        """A text field's value (None when missing and not required) and its path."""
        value, path = self.field(container, ours, prefix)
        if value is None and required:
            fail("missing_field", path, f"'{self.key(ours)}' is missing")
        return (None if value is None else self.text(value, path)), path


@dataclass
class _Turn:
    """A message on its way to validation, with the file paths of its role and content for error reports."""

    role: str
    content: str
    role_path: str
    content_path: str
    raw_role: str
    tool_calls: list[dict[str, Any]] | None = None
    name: str | None = None
    alpaca: tuple[str, str] | None = None


def detect_format(record: Any, columns: dict[str, str] | None = None) -> str | None:
    """The format a record is in, judged by its keys (after the column mapping); None if no format fits. Never
    "text": a `text` key alone does not tell a document from an Alpaca record missing its fields."""
    if not isinstance(record, dict):
        return None
    columns = columns or {}
    keys = (("messages", "openai"), ("conversations", "sharegpt"), ("conversation", "firefly"))
    keys += (("instruction", "alpaca"), ("output", "alpaca"), ("instances", "alpaca"))
    return next((fmt for key, fmt in keys if record.get(columns.get(key, key)) is not None), None)


def to_conversation(
    record: Any, *, fmt: str, source: SourceConfig, ref: SampleRef, file: str, location: str
) -> Conversation | TextDocument | BadRecord:
    """One record -> Conversation (TextDocument for fmt "text"), or a BadRecord saying why not (reason FILTERED
    when `where` leaves it out)."""
    return convert_record(record, fmt=fmt, source=source, ref=ref, file=file, location=location)[0]


def convert_record(
    record: Any, *, fmt: str, source: SourceConfig, ref: SampleRef, file: str, location: str
) -> tuple[Conversation | TextDocument | BadRecord, int]:
    """Like `to_conversation`, also returning how many trailing non-assistant messages were trimmed."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown record format {fmt!r}; expected one of {', '.join(FORMATS)}")
    try:
        if not isinstance(record, dict):
            fail("wrong_type", None, f"a record must be a JSON object, got {type_name(record)}")
        for key, wanted in source.where.items():
            if record.get(key) != wanted:
                raise Reject(FILTERED, key, f"{key} is {record.get(key)!r}, where wants {wanted!r}")
        context = _Context.of(source)
        if fmt == "text":
            return _text_document(record, context, ref), 0
        turns, system, list_path = _ADAPTERS[fmt](record, context)
        tools_value, tools_path = context.field(record, "tools")
        tools = _normalise_tools(tools_value, tools_path)
        source_system = source.system and context.text(source.system, "system")
        messages, trimmed = _finish(turns, system, source_system, list_path)
    except Reject as reject:
        return BadRecord(reject.reason, file, location, reject.field, reject.detail), 0
    category = record.get("category")
    category = category if isinstance(category, str) and category.strip() else None
    return Conversation(messages=messages, ref=ref, tools=tools, category=category), trimmed


# --------------------------------------------------------------------------------------------- adapters


def _text_document(record: dict, context: _Context, ref: SampleRef) -> TextDocument:
    text, path = context.text_field(record, "text")
    if not text.strip():
        fail("empty_text", path, "the document is empty" if not text else "the document is only whitespace")
    return TextDocument(text=text, ref=ref)


def _alpaca(record: dict, context: _Context) -> tuple[list[_Turn], str | None, str]:
    system, _ = context.text_field(record, "system", required=False)
    turns: list[_Turn] = []
    history, history_path = context.field(record, "history")
    if history is not None:
        if not isinstance(history, list):
            fail("wrong_type", history_path, f"expected [[prompt, answer], ...], got {type_name(history)}")
        for index, pair in enumerate(history):
            path = f"{history_path}[{index}]"
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                fail("wrong_type", path, "expected a [prompt, answer] pair")
            prompt, answer = context.text(pair[0], f"{path}[0]"), context.text(pair[1], f"{path}[1]")
            turns.append(_Turn("user", prompt, f"{path}[0]", f"{path}[0]", "history"))
            turns.append(_Turn("assistant", answer, f"{path}[1]", f"{path}[1]", "history"))
    instruction, instruction_path = context.text_field(record, "instruction")
    holder, prefix = record, ""
    output_value, _ = context.field(record, "output")
    instances, instances_path = context.field(record, "instances")
    if output_value is None and instances is not None:  # Self-Instruct: the first instance
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            fail("wrong_type", instances_path, "expected a non-empty array of {input, output} objects")
        holder, prefix = instances[0], f"{instances_path}[0]"
    given_input, _ = context.text_field(holder, "input", prefix, required=False)
    output, output_path = context.text_field(holder, "output", prefix)
    given_input = given_input if given_input and given_input.strip() else ""
    if given_input and instruction:
        content = f"{instruction}\n\n{given_input}"
    else:
        content = instruction or given_input
    alpaca = (instruction, given_input)
    turns.append(_Turn("user", content, instruction_path, instruction_path, "instruction", alpaca=alpaca))
    turns.append(_Turn("assistant", output, output_path, output_path, "output"))
    return turns, system, instruction_path


def _firefly(record: dict, context: _Context) -> tuple[list[_Turn], str | None, str]:
    system, _ = context.text_field(record, "system", required=False)
    items, list_path = _required_list(record, context, "conversation")
    turns: list[_Turn] = []
    for index, item in enumerate(items):
        path = f"{list_path}[{index}]"
        if not isinstance(item, dict):
            fail("wrong_type", path, f"expected an object with human and assistant, got {type_name(item)}")
        human, human_path = context.text_field(item, "human", path)
        reply, reply_path = context.text_field(item, "assistant", path)
        turns.append(_Turn("user", human, human_path, human_path, context.key("human")))
        turns.append(_Turn("assistant", reply, reply_path, reply_path, context.key("assistant")))
    return turns, system, list_path


def _required_list(record: dict, context: _Context, ours: str) -> tuple[list, str]:
    items, path = context.field(record, ours)
    if items is None:
        fail("missing_field", path, f"'{path}' is missing")
    if not isinstance(items, list):
        fail("wrong_type", path, f"expected an array of messages, got {type_name(items)}")
    return items, path


def _chat(
    record: dict, context: _Context, names: tuple[str, str, str]
) -> tuple[list[_Turn], str | None, str]:
    """ShareGPT and OpenAI lists of messages: they differ only in key names (list, role, content)."""
    list_name, role_name, content_name = names
    system, _ = context.text_field(record, "system", required=False)
    items, list_path = _required_list(record, context, list_name)
    turns: list[_Turn] = []
    for index, item in enumerate(items):
        path = f"{list_path}[{index}]"
        if not isinstance(item, dict):
            fail("wrong_type", path, f"expected a message object, got {type_name(item)}")
        raw_role, role_path = context.text_field(item, role_name, path)
        role = context.roles.get(raw_role)
        if role is None:
            known = ", ".join(sorted(context.roles))
            fail("unknown_role", role_path, f"unknown role {raw_role!r} (known: {known}; add it to roles:)")
        content_value, content_path = context.field(item, content_name, path)
        if role == "function_call":
            calls = _function_call_turn(content_value, content_path)
            previous = turns[-1] if turns else None
            if previous is not None and previous.role == "assistant":
                previous.tool_calls = (previous.tool_calls or []) + calls
                continue
            turns.append(_Turn("assistant", "", role_path, content_path, raw_role, tool_calls=calls))
            continue
        calls_value, calls_path = context.field(item, "tool_calls", path)
        tool_calls = None
        if calls_value is not None:
            if role != "assistant":
                fail("invalid_tool_call", calls_path, f"a {raw_role!r} message cannot make tool calls")
            tool_calls = _normalise_tool_calls(calls_value, calls_path)
        if content_value is None and not tool_calls:
            fail("missing_field", content_path, f"'{context.key(content_name)}' is missing")
        content = "" if content_value is None else _content(context, content_value, content_path)
        name = None
        if role == "tool":
            name, _ = context.text_field(item, "name", path, required=False)
        turns.append(
            _Turn(role, content, role_path, content_path, raw_role, tool_calls=tool_calls, name=name)
        )
    return turns, system, list_path


def _content(context: _Context, value: Any, path: str) -> str:
    if isinstance(value, list):  # OpenAI content parts: text only
        texts = []
        for index, part in enumerate(value):
            part_path = f"{path}[{index}]"
            if isinstance(part, str):
                texts.append(context.text(part, part_path))
            elif isinstance(part, dict) and part.get("type", "text") == "text" and "text" in part:
                texts.append(context.text(part["text"], f"{part_path}.text"))
            else:
                kind = part.get("type") if isinstance(part, dict) else type_name(part)
                fail("wrong_type", part_path, f"content part {kind!r} is not text")
        return "".join(texts)
    return context.text(value, path)


# --------------------------------------------------------------------------------------------- tools


def _parse_json(value: Any, path: str, reason: str) -> Any:
    if not isinstance(value, str):
        return value
    check_utf8(value, path)
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        fail(reason, path, f"not valid JSON: {error.msg} at column {error.colno}")


def _function_call_turn(value: Any, path: str) -> list[dict[str, Any]]:
    if value is None:
        fail("missing_field", path, "a function_call turn needs a value")
    parsed = _parse_json(value, path, "invalid_tool_call")
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls:
        fail("invalid_tool_call", path, "an empty list of tool calls")
    return [
        _tool_call(call, path if len(calls) == 1 else f"{path}[{index}]") for index, call in enumerate(calls)
    ]


def _normalise_tool_calls(value: Any, path: str) -> list[dict[str, Any]] | None:
    if not isinstance(value, list):
        fail("invalid_tool_call", path, f"expected an array of tool calls, got {type_name(value)}")
    return [_tool_call(call, f"{path}[{index}]") for index, call in enumerate(value)] or None


def _tool_call(value: Any, path: str) -> dict[str, Any]:
    """{"name", "arguments"} or {"type": "function", "function": {...}, "id"?} -> OpenAI form, arguments a dict."""
    if not isinstance(value, dict):
        fail("invalid_tool_call", path, f"expected a tool call object, got {type_name(value)}")
    function = value.get("function", value)
    if not isinstance(function, dict) or value.get("type", "function") != "function":
        fail("invalid_tool_call", path, "expected {'type': 'function', 'function': {name, arguments}}")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        fail("invalid_tool_call", f"{path}.name", "a tool call needs a function name")
    check_utf8(name, f"{path}.name")
    arguments = _parse_json(function.get("arguments", {}), f"{path}.arguments", "invalid_tool_call")
    if not isinstance(arguments, dict):
        fail("invalid_tool_call", f"{path}.arguments", f"expected a JSON object, got {type_name(arguments)}")
    check_utf8(json.dumps(arguments, ensure_ascii=False), f"{path}.arguments")
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call


def _normalise_tools(value: Any, path: str) -> list[dict[str, Any]] | None:
    """A JSON string or a list of tools, each bare {name, description, parameters} (glaive) or in OpenAI form."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    tools = _parse_json(value, path, "invalid_tools")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        fail("invalid_tools", path, f"expected an array of tools, got {type_name(tools)}")
    normalised = []
    for index, tool in enumerate(tools):
        tool_path = f"{path}[{index}]"
        if not isinstance(tool, dict):
            fail("invalid_tools", tool_path, f"expected a tool object, got {type_name(tool)}")
        function = tool
        if "function" in tool:
            function, tool_path = tool["function"], f"{tool_path}.function"
            if tool.get("type", "function") != "function" or not isinstance(function, dict):
                fail("invalid_tools", tool_path, "expected {'type': 'function', 'function': {...}}")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            fail("invalid_tools", f"{tool_path}.name", "a tool needs a name")
        if not isinstance(function.get("parameters", {}), dict):
            fail("invalid_tools", f"{tool_path}.parameters", "parameters must be a JSON schema object")
        if not isinstance(function.get("description", ""), str):
            fail("invalid_tools", f"{tool_path}.description", "description must be a string")
        check_utf8(json.dumps(function, ensure_ascii=False), tool_path)
        normalised.append({"type": "function", "function": dict(function)})
    return normalised or None


# --------------------------------------------------------------------------------------------- validation


def _finish(
    turns: list[_Turn], record_system: str | None, source_system: str | None, list_path: str
) -> tuple[list[Message], int]:
    """Place the system prompt, trim trailing non-assistant turns, check the role order -> messages."""
    if turns and turns[0].role == "system" and not turns[0].content.strip():
        turns = turns[1:]
    if not (turns and turns[0].role == "system"):
        system = next((text for text in (record_system, source_system) if text and text.strip()), None)
        if system is not None:
            turns = [_Turn("system", system, "system", "system", "system"), *turns]
    last_reply = max((index for index, turn in enumerate(turns) if turn.role == "assistant"), default=None)
    if last_reply is None:
        fail("no_assistant", list_path, "the record has no assistant reply")
    trimmed = len(turns) - last_reply - 1
    turns = turns[: last_reply + 1]
    previous: _Turn | None = None
    for index, turn in enumerate(turns):
        said = f"{turn.raw_role!r}" + (f" ({turn.role})" if turn.raw_role != turn.role else "")
        if turn.role == "system" and index > 0:
            fail("role_order", turn.role_path, f"a system message is allowed first only, found {said} later")
        elif previous is None or previous.role == "system":
            if turn.role != "user" and turn.role != "system":
                fail("role_order", turn.role_path, f"the first message must come from the user, not {said}")
        elif turn.role == "assistant" and previous.role not in ("user", "tool"):
            fail("role_order", turn.role_path, f"an assistant reply after a {previous.role} message")
        elif turn.role == "tool" and not (previous.role == "tool" or previous.tool_calls):
            fail("role_order", turn.role_path, "a tool result without a tool call before it")
        elif turn.role == "user" and previous.role == "user":
            fail("role_order", turn.role_path, "two user messages in a row")
        if turn.role == "assistant" and not turn.tool_calls and not turn.content.strip():
            fail("empty_assistant", turn.content_path, "the assistant reply is empty")
        previous = turn
    users = [turn for turn in turns if turn.role == "user"]  # one at least: the order rules held
    if not any(user.content.strip() for user in users):
        detail = (
            f"all {len(users)} user messages are empty" if len(users) > 1 else "the user message is empty"
        )
        detail = "the instruction and the input are empty" if users[0].alpaca and len(users) == 1 else detail
        fail("empty_prompt", users[0].content_path, detail)
    messages = [
        Message(t.role, t.content, tool_calls=t.tool_calls, name=t.name, alpaca=t.alpaca) for t in turns
    ]
    return messages, trimmed


_ADAPTERS = {
    "alpaca": _alpaca,
    "sharegpt": partial(_chat, names=("conversations", "from", "value")),
    "openai": partial(_chat, names=("messages", "role", "content")),
    "firefly": _firefly,
}
