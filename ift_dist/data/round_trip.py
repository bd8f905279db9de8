"""The round trip that proves labels right: a sample's supervised tokens decoded back into the assistant turns
they must equal."""

from __future__ import annotations

from typing import Any

from ift_dist.data.contracts import IGNORE_INDEX, Conversation, RenderedSample


def supervised_turns(sample: RenderedSample, tokenizer: Any) -> list[tuple[str, str]]:
    """Each maximal run of supervised tokens, decoded as (reply, end-of-turn marker): the marker is the run's
    trailing special tokens (with whitespace between them), "" when the run ends in none."""
    special = set(tokenizer.all_special_ids)
    special.update(index for index, token in tokenizer.added_tokens_decoder.items() if token.special)
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != IGNORE_INDEX:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    turns = []
    for run in runs:
        split = len(run)
        while split > 0 and (run[split - 1] in special or not decode(run[split - 1 : split]).strip()):
            split -= 1
        while (
            split < len(run) and run[split] not in special
        ):  # whitespace before the marker stays in the reply
            split += 1
        turns.append((decode(run[:split]), decode(run[split:])))
    return turns


def round_trip_errors(
    sample: RenderedSample, conversation: Conversation, tokenizer: Any, supervise: str
) -> list[str]:
    """The proof that labels are right: the supervised tokens decode to exactly the content of each kept assistant
    turn (whitespace at its ends aside, which templates trim) followed by an end-of-turn marker; a tool-call turn
    must show its content and every called tool's name. Returns what does not match (empty = proven)."""
    messages = list(conversation.messages)
    while messages and messages[-1].role != "assistant":
        messages.pop()
    messages = messages[: len(messages) - sample.dropped_turns]
    expected = [message for message in messages if message.role == "assistant"]
    if supervise == "last_assistant":
        expected = expected[-1:]
    turns = supervised_turns(sample, tokenizer)
    if len(turns) != len(expected):
        return [f"{sample.ref}: {len(turns)} supervised runs for {len(expected)} assistant turns"]
    errors = []
    for number, ((reply, marker), message) in enumerate(zip(turns, expected, strict=True)):
        where = f"{sample.ref} assistant turn {number}"
        last = number == len(expected) - 1
        if sample.truncated and last:
            if not message.content.strip().startswith(reply.strip()):
                errors.append(f"{where}: truncated reply {reply[:60]!r} is not a prefix of the content")
            continue
        if message.tool_calls:
            names = [(call.get("function") or call).get("name", "") for call in message.tool_calls]
            missing = [name for name in names if name not in reply]
            if missing or message.content.strip() not in reply:
                errors.append(f"{where}: tool-call reply {reply[:80]!r} lacks {missing or 'the content'}")
        elif reply.strip() != message.content.strip():
            errors.append(f"{where}: supervised {reply[:80]!r} != content {message.content[:80]!r}")
        if not marker:
            errors.append(f"{where}: no end-of-turn marker supervised after {reply[-40:]!r}")
    return errors
