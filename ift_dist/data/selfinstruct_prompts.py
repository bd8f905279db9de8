"""What `ift data generate` says to the model and how it reads the reply: Stanford Alpaca's numbered-list prompt and
a JSON-array topic prompt, with their parsers.

ALPACA_PROMPT is the text of prompt.txt from Stanford Alpaca (https://github.com/tatsu-lab/stanford_alpaca,
Copyright 2023 the Stanford Alpaca authors, Apache License 2.0), with the list size "20" turned into the
`{num_tasks}` placeholder and the duplicated requirement numbers (2., 3. appear twice there) kept as they are, since
published data was generated with them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ift_dist.config.choices import Choice

ALPACA_PROMPT = """\
You are asked to come up with a set of {num_tasks} diverse task instructions. These task instructions will be given \
to a GPT model and we will evaluate the GPT model for completing the instructions.

Here are the requirements:
1. Try not to repeat the verb for each instruction to maximize diversity.
2. The language used for the instruction also should be diverse. For example, you should combine questions with \
imperative instructions.
3. The type of instructions should be diverse. The list should include diverse types of tasks like open-ended \
generation, classification, editing, etc.
2. A GPT language model should be able to complete the instruction. For example, do not ask the assistant to create \
any visual or audio output. For another example, do not ask the assistant to wake you up at 5pm or set a reminder \
because it cannot perform any action.
3. The instructions should be in English.
4. The instructions should be 1 to 2 sentences long. Either an imperative sentence or a question is permitted.
5. You should generate an appropriate input to the instruction. The input field should contain a specific example \
provided for the instruction. It should involve realistic data and should not contain simple placeholders. The input \
should provide substantial content to make the instruction challenging but should ideally not exceed 100 words.
6. Not all instructions require input. For example, when a instruction asks about some general information, "what \
is the highest peak in the world", it is not necessary to provide a specific context. In this case, we simply put \
"<noinput>" in the input field.
7. The output should be an appropriate response to the instruction and the input. Make sure the output is less \
than 100 words.

List of {num_tasks} tasks:
"""

TOPIC_PROMPT = """\
Write {count} diverse, self-contained task instructions about the topic "{topic}", each with an optional input \
and a correct, helpful output of less than 150 words. Vary the kind of task (questions, explanations, rewriting, \
classification, reasoning) and the wording. Use "" as the input when the instruction needs none.
{examples}
Reply with only a JSON array of exactly {count} objects with the string keys "instruction", "input" and "output", \
and nothing else.
"""


class ReplyStatus(Choice):
    ok = "ok"
    call_failed = "call_failed"  # no reply: retries exhausted, or an error a retry cannot fix
    truncated = "truncated"  # finish_reason "length": the last task is cut, the list may be short
    unparseable = "unparseable"  # no task block (numbered) or no JSON array (topic)
    wrong_count = "wrong_count"  # not the number of tasks asked for


@dataclass(frozen=True)
class Task:
    instruction: str
    input: str
    output: str

    def to_json(self) -> dict[str, str]:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


@dataclass(frozen=True)
class ParsedReply:
    tasks: list[Task]
    status: ReplyStatus
    malformed: int = (
        0  # blocks / array items that are not a task (missing or empty fields), rejected one by one
    )


NO_INPUT = "<noinput>"  # how the numbered list writes an empty input, in the prompt and in replies

_SPACES = re.compile(r"\s+")


def numbered_prompt(examples: Sequence[Task], num_tasks: int, template: str = ALPACA_PROMPT) -> str:
    """The template followed by the example tasks as tasks 1..k between "###" lines, ending
    with "k+1. Instruction:" for the model to continue the list up to `num_tasks`."""
    parts = [template.format(num_tasks=num_tasks)]
    for number, task in enumerate(examples, start=1):
        # One line per instruction and no trailing colon, so the "N. Input:" header below stays unambiguous.
        instruction = _SPACES.sub(" ", task.instruction).strip().rstrip(":")
        parts.append(
            f"###\n{number}. Instruction: {instruction}\n{number}. Input:\n{task.input or NO_INPUT}\n"
            f"{number}. Output:\n{task.output}\n"
        )
    parts.append(f"###\n{len(examples) + 1}. Instruction:")
    return "\n".join([parts[0], "".join(parts[1:])])


def topic_prompt(topic: str, count: int, examples: Sequence[Task] = ()) -> str:
    """Asks for `count` records about `topic` as a JSON array; `examples` are shown in the same JSON form."""
    shown = ""
    if examples:
        rows = [task.to_json() for task in examples]
        shown = (
            "\nExamples of the format (other topics):\n"
            + json.dumps(rows, ensure_ascii=False, indent=1)
            + "\n"
        )
    return TOPIC_PROMPT.format(count=count, topic=topic.strip(), examples=shown)


# --- parsing ---------------------------------------------------------------------------------------------------
# "4. Instruction:", also with markdown decoration ("**4. Instruction:**", "### 4. Input:") that chat models add.
_HEADER = re.compile(
    r"^[ \t#*]*(\d+)\s*\.\s*\**\s*(instruction|input|output)\s*\**\s*:\**[ \t]*", re.I | re.M
)
_FIELDS = ("instruction", "input", "output")


def parse_numbered(text: str, first: int, last: int) -> ParsedReply:
    """Tasks first..last of a numbered-list reply. The prompt ends with "first. Instruction:", so a reply that starts
        right with the instruction text (no header of its own) gets that header back. Blocks numbered beyond `last` are ignored (a completion
        API would have stopped there); a block without all three fields in order is malformed. Unparseable: not one
    well-formed block; wrong count: not every number first..last present."""
    if not _HEADER.match(text.lstrip("#* \t\r\n")):
        text = f"{first}. Instruction: {text.lstrip()}"
    blocks: dict[int, dict[str, str]] = {}
    order: dict[int, list[str]] = {}
    headers = list(_HEADER.finditer(text))
    for header, after in zip(headers, [*headers[1:], None], strict=True):
        number, name = int(header.group(1)), header.group(2).lower()
        body = text[header.end() : after.start() if after else len(text)]
        body = body.replace("###", "").strip()
        blocks.setdefault(number, {})[name] = body
        order.setdefault(number, []).append(name)
    numbers = [n for n in blocks if first <= n <= last]
    tasks, malformed = [], 0
    for number in sorted(numbers):
        fields = blocks[number]
        if order[number] != list(_FIELDS) or not fields["instruction"] or not fields["output"]:
            malformed += 1
            continue
        given_input = "" if fields["input"].strip().lower() == NO_INPUT else fields["input"]
        tasks.append(Task(fields["instruction"], given_input, fields["output"]))
    if not tasks:
        return ParsedReply([], ReplyStatus.unparseable, malformed)
    status = ReplyStatus.ok if sorted(numbers) == list(range(first, last + 1)) else ReplyStatus.wrong_count
    return ParsedReply(tasks, status, malformed)


_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*\n(.*?)\n\s*```\s*$", re.S)


def parse_topic_reply(text: str, count: int) -> ParsedReply:
    """A JSON array of `count` {instruction, input, output} objects (json.loads only: a reply is never executed).
    A ```json fence around it and text before or after the array are tolerated."""
    fenced = _FENCE.match(text)
    body = fenced.group(1) if fenced else text
    start = body.find("[")
    try:  # the first complete JSON value from "[": small models often add a second array or prose after it
        items = json.JSONDecoder().raw_decode(body, start)[0] if start >= 0 else None
    except json.JSONDecodeError:
        items = None
    if not isinstance(items, list):
        return ParsedReply([], ReplyStatus.unparseable)
    tasks, malformed = [], 0
    for item in items:
        values = [item.get(name, "") if isinstance(item, dict) else None for name in _FIELDS]
        if not all(isinstance(v, str) for v in values) or not values[0].strip() or not values[2].strip():
            malformed += 1
            continue
        given_input = "" if values[1].strip().lower() == NO_INPUT else values[1].strip()
        tasks.append(Task(values[0].strip(), given_input, values[2].strip()))
    return ParsedReply(tasks, ReplyStatus.ok if len(items) == count else ReplyStatus.wrong_count, malformed)
