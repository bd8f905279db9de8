"""Writes tool calls and tool schemas as plain text for chat templates that cannot render them (data.tool_fallback).

Many templates (SmolLM2's, Phi-3's, base-model built-ins) render only each message's `content`: an assistant turn
that calls a tool would render empty and the tool schemas would vanish. With the fallback, each call becomes the
line `{"name": ..., "arguments": {...}}` of the reply (after its text, if any), and the schemas are listed, one JSON
object per line, under TOOLS_HEADER in the system message (or at the start of the first user message when the
template ignores system messages), and tool results that the template would not show (Phi-3 renders user and
assistant turns only) become a user turn under TOOL_RESULT_HEADER. Prompt the fine-tuned model the same way.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TOOLS_HEADER = (
    "You can call the following tools. To call one, reply with a JSON object "
    '{"name": <tool name>, "arguments": <arguments object>} on a line of its own.\nTools:'
)
TOOL_RESULT_HEADER = "Tool result:"
_PROBE_NAME = "ift_probe_tool_7f3a"
_PROBE_RESULT = "ift probe result 7f3a"
_PROBE_SYSTEM = "ift probe system 7f3a"


@dataclass(frozen=True)
class TemplateAbilities:
    """What a chat template renders of its own accord."""

    tool_calls: bool
    tools: bool
    system: bool
    tool_role: bool


def _renders(
    apply: Callable[..., str], needle: str, messages: list[dict[str, Any]], tools: Any = None
) -> bool:
    try:
        return needle in apply(messages, tools)
    except Exception:  # a template that raises on the probe does not render it either
        return False


def probe(apply: Callable[..., str]) -> TemplateAbilities:
    """Render three tiny conversations once to learn what the template shows: a tool call, tool schemas, a system
    message. `apply(messages, tools) -> text`."""
    call = {"type": "function", "function": {"name": _PROBE_NAME, "arguments": {"x": 1}}}
    schema = {"type": "function", "function": {"name": _PROBE_NAME, "description": "probe", "parameters": {}}}
    user = {"role": "user", "content": "hi"}
    return TemplateAbilities(
        tool_calls=_renders(
            apply, _PROBE_NAME, [user, {"role": "assistant", "content": "", "tool_calls": [call]}]
        ),
        tools=_renders(apply, _PROBE_NAME, [user, {"role": "assistant", "content": "ok"}], [schema]),
        system=_renders(apply, _PROBE_SYSTEM, [{"role": "system", "content": _PROBE_SYSTEM}, user]),
        tool_role=_renders(
            apply,
            _PROBE_RESULT,
            [
                user,
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": _PROBE_NAME, "content": _PROBE_RESULT},
                {"role": "assistant", "content": "ok"},
            ],
        ),
    )


def call_text(call: dict[str, Any]) -> str:
    function = call.get("function") or call
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):
            arguments = json.loads(arguments)
    return json.dumps({"name": function.get("name", ""), "arguments": arguments}, ensure_ascii=False)


def tools_text(tools: list[dict[str, Any]]) -> str:
    return "\n".join(
        [TOOLS_HEADER, *(json.dumps(tool.get("function") or tool, ensure_ascii=False) for tool in tools)]
    )


def as_text(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, abilities: TemplateAbilities
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The conversation with what the template cannot render written into message contents."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.get("tool_calls") and not abilities.tool_calls:
            lines = [message["content"].strip()] if message["content"].strip() else []
            lines += [call_text(call) for call in message["tool_calls"]]
            message = {key: value for key, value in message.items() if key != "tool_calls"}
            message["content"] = "\n".join(lines)
        if message["role"] == "tool" and not abilities.tool_role:
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith(TOOL_RESULT_HEADER):
                out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n{message['content']}"}
                continue
            message = {"role": "user", "content": f"{TOOL_RESULT_HEADER}\n{message['content']}"}
        out.append(message)
    if tools and not abilities.tools:
        block = tools_text(tools)
        if abilities.system and out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}"}
        elif abilities.system:
            out.insert(0, {"role": "system", "content": block})
        else:
            first_user = next(index for index, message in enumerate(out) if message["role"] == "user")
            out[first_user] = {**out[first_user], "content": f"{block}\n\n{out[first_user]['content']}"}
        tools = None
    return out, tools
