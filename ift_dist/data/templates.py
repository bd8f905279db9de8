"""The chat template a run uses: a TemplateSpec compiled to Jinja, or the tokenizer's own, with data.system_prompt
written into it.

A TemplateSpec is compiled to an ordinary Hugging Face chat template (the `messages`, `tools`,
`add_generation_prompt`, `bos_token`, `eos_token` conventions of `apply_chat_template`), so the very same text is
rendered during training and, through the exported tokenizer, at inference.
"""

from __future__ import annotations

import json
import string
from typing import Any

from ift_dist.config import (
    TEMPLATE_PLACEHOLDERS,
    TEMPLATE_TOKENS,
    ConfigError,
    DataConfig,
    Template,
    TemplateSpec,
)
from ift_dist.data.builtin_templates import BUILTIN_TEMPLATES


def _literal(text: str) -> str:
    # A JSON string is a valid Jinja string literal: Jinja decodes the same backslash escapes.
    return json.dumps(text, ensure_ascii=False)


def _expression(spec: TemplateSpec, field: str, values: dict[str, str]) -> str:
    """One format field of a validated spec as a Jinja string expression, e.g. '"### Instruction:\\n" + content'."""
    allowed = {name: values[name] for name in TEMPLATE_PLACEHOLDERS[field]}
    allowed.update({name: f"({name} or '')" for name in TEMPLATE_TOKENS})
    parts = []
    for literal, name, _, _ in string.Formatter().parse(getattr(spec, field)):
        if literal:
            parts.append(_literal(literal))
        if name is not None:
            parts.append(allowed[name])
    return " + ".join(parts) if parts else "''"


def _join(*expressions: str) -> str:
    """Jinja string expressions concatenated, leaving out empty ones."""
    kept = [expression for expression in expressions if expression != "''"]
    return " + ".join(kept) if kept else "''"


def _statement(indent: int, text: str) -> str:
    return " " * indent + "{%- " + text + " %}"


def _output(indent: int, expression: str) -> str:
    return " " * indent + "{{- " + expression + " }}"


def compile_template(spec: TemplateSpec, key: str = "data.custom_template") -> str:
    """The Jinja chat template of a TemplateSpec. `key` names the spec in errors (ConfigError)."""
    spec.validate(key)

    def expr(field: str, **values: str) -> str:
        return _expression(spec, field, values)

    content = "(message['content'] or '')"
    has_input = "message['input'] is defined and message['input']"
    lines = [
        "{#- Compiled by ift_dist.data.templates from a TemplateSpec. #}",
        _statement(0, "if messages and messages[0]['role'] == 'system'"),
        _statement(4, "set system_message = messages[0]['content']"),
        _statement(4, "set loop_messages = messages[1:]"),
        _statement(0, "else"),
        _statement(4, "set loop_messages = messages"),
    ]
    if spec.default_system_with_input is not None:
        lines += [
            _statement(4, f"if loop_messages and {has_input.replace('message[', 'loop_messages[0][')}"),
            _statement(8, f"set system_message = {_literal(spec.default_system_with_input)}"),
            _statement(4, "else"),
            _statement(8, f"set system_message = {_literal(spec.default_system)}"),
            _statement(4, "endif"),
        ]
    else:
        lines.append(_statement(4, f"set system_message = {_literal(spec.default_system)}"))
    lines += [
        _statement(0, "endif"),
        # Tool schemas join the system block, one JSON object per line.
        _statement(0, "if tools"),
        _statement(4, "set tool_lines = namespace(text='')"),
        _statement(4, "for tool in tools"),
        _statement(
            8, "set tool_lines.text = tool_lines.text + ('\\n' if not loop.first else '') + (tool | tojson)"
        ),
        _statement(4, "endfor"),
        _statement(4, f"set tools_block = {expr('tools', tools='tool_lines.text')}"),
        _statement(
            4,
            "set system_message = system_message + '\\n\\n' + tools_block if system_message else tools_block",
        ),
        _statement(0, "endif"),
    ]
    if spec.prefix:
        lines.append(_output(0, expr("prefix")))
    if spec.system_in_first_user is None:
        lines += [
            _statement(0, "if system_message"),
            _output(4, expr("system", content="system_message")),
            _statement(0, "endif"),
        ]
    lines += [_statement(0, "for message in loop_messages"), _statement(4, "if message['role'] == 'user'")]

    def user_turn(indent: int) -> list[str]:
        plain = _output(indent, expr("user", content=content))
        if spec.user_with_input is None:
            return [plain]
        with_input = expr("user_with_input", instruction="message['instruction']", input="message['input']")
        return [
            _statement(indent, f"if {has_input}"),
            _output(indent + 4, with_input),
            _statement(indent, "else"),
            "    " + plain,
            _statement(indent, "endif"),
        ]

    if spec.system_in_first_user is not None:
        folded = expr("system_in_first_user", system="system_message", content=content)
        user = [_statement(8, "if loop.first and system_message"), _output(12, folded), _statement(8, "else")]
        user += [*user_turn(12), _statement(8, "endif")]
    else:
        user = user_turn(8)
    lines += user
    lines += [
        _statement(4, "elif message['role'] == 'assistant'"),
        # Tool calls follow the reply's text, each in the spec's tool_call format.
        _statement(8, f"set reply = namespace(text={content})"),
        _statement(8, "if message['tool_calls'] is defined and message['tool_calls']"),
        _statement(12, "for call in message['tool_calls']"),
        _statement(16, "set function = call['function'] if call['function'] is defined else call"),
        _statement(
            16,
            "set arguments = function['arguments'] if function['arguments'] is string"
            " else function['arguments'] | tojson",
        ),
        _statement(
            16,
            "set reply.text = reply.text + ('\\n' if reply.text else '') + "
            + expr("tool_call", name="function['name']", arguments="arguments"),
        ),
        _statement(12, "endfor"),
        _statement(8, "endif"),
        _output(8, _join(expr("assistant_prefix"), expr("assistant", content="reply.text"))),
        _output(8, _join(expr("assistant_suffix"), expr("separator"))),
        _statement(4, "elif message['role'] == 'tool'"),
        _output(8, expr("tool", content=content, name="(message['name'] or '')")),
        _statement(4, "elif message['role'] == 'system'"),
        _output(8, expr("system", content=content)),
        _statement(4, "endif"),
        _statement(0, "endfor"),
    ]
    if spec.assistant_prefix:
        lines += [
            _statement(0, "if add_generation_prompt"),
            _output(4, expr("assistant_prefix")),
            _statement(0, "endif"),
        ]
    return "\n".join(lines) + "\n"


def end_of_turn_marker(spec: TemplateSpec, tokenizer: Any) -> str:
    """The text of a spec's end-of-turn marker for this tokenizer (assistant_suffix with its tokens filled in)."""
    return spec.assistant_suffix.format(
        bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or ""
    )


def template_spec(cfg: DataConfig) -> TemplateSpec | None:
    """The TemplateSpec a validated config selects (a built-in or the custom one), or None for a Jinja template."""
    if cfg.template == Template.tokenizer:
        return None
    if cfg.template == Template.custom:
        return cfg.custom_template
    return BUILTIN_TEMPLATES[cfg.template]


def with_system_prompt(template: str, system_prompt: str) -> str:
    """`template` preceded by a preamble that makes `system_prompt` the system message of every conversation that has
    none (data.system_prompt): the template's own default system text (SmolLM2's "You are a helpful AI assistant named
    SmolLM, ...") no longer applies, and a tokenizer carrying the result prompts the same way at inference. After the
    preamble's top-level assignment, every use of `messages` in the template (loops and macros too) sees the new
    list."""
    message = "{'role': 'system', 'content': " + _literal(system_prompt) + "}"
    return (
        "{#- data.system_prompt, added by ift_dist.data.templates.with_system_prompt #}\n"
        "{%- if messages and messages[0]['role'] != 'system' %}"
        f"{{%- set messages = [{message}] + messages %}}"
        "{%- endif %}\n" + template
    )


def resolve_chat_template(tokenizer: Any, cfg: DataConfig) -> str:
    """The Jinja chat template a run renders with: data.chat_template if given, else the tokenizer's own
    (data.template = "tokenizer"), else the compiled built-in or custom TemplateSpec; with data.system_prompt (when
    set) as the system message of conversations that have none."""
    template = _base_chat_template(tokenizer, cfg)
    return template if cfg.system_prompt is None else with_system_prompt(template, cfg.system_prompt)


def _base_chat_template(tokenizer: Any, cfg: DataConfig) -> str:
    spec = template_spec(cfg)
    if spec is not None:
        key = "data.custom_template" if cfg.template == Template.custom else f"data.template ({cfg.template})"

        return compile_template(spec, key)
    if cfg.chat_template:
        return cfg.chat_template
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates (e.g. "default", "tool_use"): the default one
        own = own.get("default")
    if not own:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(
            f"data.template: the tokenizer {name!r} has no chat template; set data.template to one of "
            + ", ".join(sorted(BUILTIN_TEMPLATES))
            + ", or 'custom' with data.custom_template, or give a Jinja template in data.chat_template"
        )
    return own
