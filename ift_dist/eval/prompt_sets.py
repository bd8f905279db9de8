"""A held-out prompt set (a named benchmark under the eval data directory, or a user's JSONL file) -> EvalPrompts.

Named sets (files under <data dir>/<name>/; ../shared/data/README.md describes each copy):

    name           file                                     id           category        reference
    mt_bench       question.jsonl (2 turns)                 question_id  category        reference_answer_gpt-4.jsonl
    vicuna_bench   question.jsonl                           question_id  category        -
    self_instruct  user_oriented_instructions.jsonl         id           motivation_app  instances[0].output
    alpaca_eval    gpt4_1106_preview_model_outputs.json     index        dataset         output (GPT-4-1106)
    arena_hard     arena-hard-v0.1_question.jsonl           uid          cluster         -
    alignbench     data_v1.1_release.jsonl                  question_id  category        reference
    ifeval         input_data.jsonl                         key          -               -   (extra: instruction_id_list, kwargs)

An instruction with an input (Self-Instruct, Alpaca records) is one user turn, "instruction\\n\\ninput", as
AlpacaEval writes the same Self-Instruct prompts.

A user file is JSONL (or a JSON array) of OpenAI records {"messages": [{"role", "content"}...]} (a leading system
message becomes the system prompt, the user turns are asked, the assistant replies, if any, are the reference: one
after every user turn, or none), Alpaca records {"instruction", "input"?, "output"?, "system"?} or plain prompts
{"prompt", "system"?}; or a .txt file, one prompt a line (blank lines skipped). Its id is the record's "id" when it
has one, else its 0-based index; its category the record's "category" or None.

Policy on bad input: a prompt set is curated, so a bad record raises PromptSetError naming the file, the line (a
JSON array: the record number) and the field; nothing is skipped, as a skipped prompt would change a score.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ift_dist.eval.benchmarks import DATA_DIR_VARIABLE, DEFAULT_DATA_DIR


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt to answer: the user turns asked in order, each after the model's own answers to the earlier ones."""

    id: str  # the set's own id, as a string
    set: str  # the set's name, or the stem of a user file
    category: str | None
    turns: list[str]  # the user turns, at least one
    system: str | None = None  # a system prompt, or None (the chat template's own default applies)
    reference: list[str] | None = None  # a reference answer per turn, or None
    extra: dict[str, Any] = field(default_factory=dict)  # set-specific fields (IFEval's instruction ids, ...)


class PromptSetError(ValueError):
    """A prompt set that cannot be read as it is: the message says `file:line: field: problem`."""


SET_FILES = {
    "mt_bench": "mt_bench/question.jsonl",
    "vicuna_bench": "vicuna_bench/question.jsonl",
    "self_instruct": "self_instruct/user_oriented_instructions.jsonl",
    "alpaca_eval": "alpaca_eval/gpt4_1106_preview_model_outputs.json",
    "arena_hard": "arena_hard/arena-hard-v0.1_question.jsonl",
    "alignbench": "alignbench/data_v1.1_release.jsonl",
    "ifeval": "ifeval/input_data.jsonl",
}
SET_NAMES = tuple(SET_FILES)
MT_BENCH_REFERENCES = "mt_bench/reference_answer_gpt-4.jsonl"


def data_root(data_dir: str = "") -> Path:
    """Where the named sets live: data_dir, else $IFT_EVAL_DATA, else ../shared/data/eval (as for MMLU)."""
    return Path(data_dir or os.environ.get(DATA_DIR_VARIABLE) or DEFAULT_DATA_DIR)


def set_label(name_or_path: str) -> str:
    """The name answers are written under: the set's name, or a user file's stem."""
    return name_or_path if name_or_path in SET_FILES else Path(name_or_path).stem


def prompts_file(name_or_path: str, data_dir: str = "") -> Path:
    """The file a set is read from."""
    if name_or_path in SET_FILES:
        return data_root(data_dir) / SET_FILES[name_or_path]
    return Path(name_or_path)


def load_prompt_set(name_or_path: str, *, data_dir: str = "", limit: int = 0) -> list[EvalPrompt]:
    """The prompts of a named set or a user file, in file order; the first `limit` of them when limit > 0."""
    path = prompts_file(name_or_path, data_dir)
    if not path.is_file():
        hint = f" (named sets: {', '.join(SET_NAMES)}; data directory: data_dir, ${DATA_DIR_VARIABLE})"
        raise PromptSetError(f"{path}: prompt set {name_or_path!r} not found{hint}")
    label = set_label(name_or_path)
    parse = _PARSERS.get(name_or_path, _user_record)
    rows = [_Row(where, record) for where, record in _records(path)]
    prompts = [parse(row, label, index) for index, row in enumerate(rows)]
    if name_or_path == "mt_bench":
        prompts = _with_mt_bench_references(prompts, path.parent.parent / MT_BENCH_REFERENCES)
    seen: dict[str, str] = {}
    for prompt, row in zip(prompts, rows, strict=True):
        if prompt.id in seen:
            raise row.error("id", f"{prompt.id!r} repeats the id of {seen[prompt.id]}")
        seen[prompt.id] = row.where
    return prompts[:limit] if limit > 0 else prompts


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) of a JSONL file (location `file:line`), of a JSON array (`file: record N`) or of a .txt
    file ({"prompt": line} per non-empty line)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        located = [
            (f"{path}:{number}", {"prompt": line.strip()})
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    elif path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise PromptSetError(f"{path}:{error.lineno}: not JSON: {error.msg}") from None
        located = [(f"{path}: record {number}", record) for number, record in enumerate(records)]
    else:
        located = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise PromptSetError(f"{path}:{number}: not JSON: {error.msg}") from None
    for where, record in located:
        if not isinstance(record, dict):
            raise PromptSetError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
        yield where, record


@dataclass(frozen=True)
class _Row:
    """A record and where it is, with typed field access that names both in its errors."""

    where: str
    record: dict[str, Any]

    def error(self, name: str, problem: str) -> PromptSetError:
        return PromptSetError(f"{self.where}: {name}: {problem}")

    def get(self, name: str, kind: type | tuple[type, ...], *, required: bool = True) -> Any:
        if name not in self.record or self.record[name] is None:
            if required:
                raise self.error(name, "missing")
            return None
        value = self.record[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            wanted = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.error(name, f"expected {wanted}, got {type(value).__name__}")
        return value

    def text(self, name: str, *, required: bool = True, empty: bool = False) -> str | None:
        value = self.get(name, str, required=required)
        if value is not None and not empty and not value.strip():
            raise self.error(name, "empty")
        return value

    def identifier(self, name: str) -> str:
        return str(self.get(name, (str, int)))

    def texts(self, name: str) -> list[str]:
        values = self.get(name, list)
        if not values:
            raise self.error(name, "empty list")
        for number, value in enumerate(values):
            if not isinstance(value, str) or not value.strip():
                raise self.error(f"{name}[{number}]", "expected a non-empty string")
        return list(values)


def _joined(instruction: str, extra_input: str) -> str:
    return f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction


def _fastchat_question(row: _Row, label: str, index: int) -> EvalPrompt:
    extra = {"question_reference": row.get("reference", list)} if "reference" in row.record else {}
    return EvalPrompt(
        row.identifier("question_id"), label, row.text("category"), row.texts("turns"), extra=extra
    )


def _with_mt_bench_references(prompts: list[EvalPrompt], path: Path) -> list[EvalPrompt]:
    """MT-bench's GPT-4 reference answers (math, reasoning, coding), joined by question_id: choices[0].turns."""
    if not path.is_file():
        raise PromptSetError(f"{path}: MT-bench reference answers not found")
    references: dict[str, list[str]] = {}
    for where, record in _records(path):
        row = _Row(where, record)
        choices = row.get("choices", list)
        if not choices or not isinstance(choices[0], dict):
            raise row.error("choices", "expected a non-empty list of objects")
        references[row.identifier("question_id")] = _Row(where, choices[0]).texts("turns")
    return [
        EvalPrompt(p.id, p.set, p.category, p.turns, p.system, references.get(p.id), p.extra) for p in prompts
    ]


def _self_instruct(row: _Row, label: str, index: int) -> EvalPrompt:
    instances = row.get("instances", list)
    if not instances or not isinstance(instances[0], dict):
        raise row.error("instances", "expected a non-empty list of objects")
    instance = _Row(row.where, instances[0])
    turn = _joined(row.text("instruction"), instance.text("input", empty=True))
    return EvalPrompt(
        row.identifier("id"), label, row.text("motivation_app"), [turn], reference=[instance.text("output")]
    )


def _alpaca_eval(row: _Row, label: str, index: int) -> EvalPrompt:
    extra = {"generator": row.text("generator", required=False)}
    return EvalPrompt(
        str(index), label, row.text("dataset"), [row.text("instruction")], None, [row.text("output")], extra
    )


def _arena_hard(row: _Row, label: str, index: int) -> EvalPrompt:
    extra = {"category": row.text("category", required=False)}
    return EvalPrompt(row.identifier("uid"), label, row.text("cluster"), [row.text("prompt")], extra=extra)


def _alignbench(row: _Row, label: str, index: int) -> EvalPrompt:
    extra = {"subcategory": row.text("subcategory", required=False)}
    return EvalPrompt(
        row.identifier("question_id"), label, row.text("category"), [row.text("question")], None,
        [row.text("reference")], extra,
    )  # fmt: skip


def _ifeval(row: _Row, label: str, index: int) -> EvalPrompt:
    instructions, kwargs = row.get("instruction_id_list", list), row.get("kwargs", list)
    if len(instructions) != len(kwargs):
        raise row.error("kwargs", f"{len(kwargs)} entries for {len(instructions)} instruction ids")
    extra = {"instruction_id_list": instructions, "kwargs": kwargs}
    return EvalPrompt(row.identifier("key"), label, None, [row.text("prompt")], extra=extra)


def _user_record(row: _Row, label: str, index: int) -> EvalPrompt:
    """An OpenAI messages record, an Alpaca record or a plain prompt of a user's file."""
    prompt_id = row.identifier("id") if "id" in row.record else str(index)
    category = row.text("category", required=False)
    if "messages" in row.record:
        system, turns, replies = _conversation(row)
        return EvalPrompt(prompt_id, label, category, turns, system, replies or None)
    if "instruction" in row.record:
        turn = _joined(row.text("instruction"), row.text("input", required=False, empty=True) or "")
        output = row.text("output", required=False, empty=True)
        reference = [output] if output and output.strip() else None
        return EvalPrompt(prompt_id, label, category, [turn], row.text("system", required=False), reference)
    if "prompt" in row.record:
        return EvalPrompt(
            prompt_id, label, category, [row.text("prompt")], row.text("system", required=False)
        )
    raise row.error("messages", "missing (a record needs messages (OpenAI), instruction (Alpaca) or prompt)")


def _conversation(row: _Row) -> tuple[str | None, list[str], list[str]]:
    """(system, user turns, assistant replies) of a messages list: an optional system message first, then user and
    assistant alternating from a user turn; replies follow every user turn or none."""
    messages = row.get("messages", list)
    system, turns, replies = None, [], []
    for number, message in enumerate(messages):
        name = f"messages[{number}]"
        if not isinstance(message, dict):
            raise row.error(name, f"expected an object, got {type(message).__name__}")
        item = _Row(row.where, message)
        role, content = item.get("role", str), item.get("content", str)
        if role == "system" and number == 0:
            system = content
            continue
        expected = "user" if len(turns) == len(replies) else "assistant"
        if role != expected:
            raise row.error(f"{name}.role", f"expected {expected!r} here, got {role!r}")
        if not content.strip():
            raise row.error(f"{name}.content", "empty")
        (turns if role == "user" else replies).append(content)
    if not turns:
        raise row.error("messages", "no user message")
    if replies and len(replies) != len(turns):
        raise row.error("messages", "an assistant reply must follow every user turn, or none (no reference)")
    return system, turns, replies


_PARSERS: dict[str, Callable[[_Row, str, int], EvalPrompt]] = {
    "mt_bench": _fastchat_question,
    "vicuna_bench": _fastchat_question,
    "self_instruct": _self_instruct,
    "alpaca_eval": _alpaca_eval,
    "arena_hard": _arena_hard,
    "alignbench": _alignbench,
    "ifeval": _ifeval,
}
