"""Splits a conversation into one sample per assistant turn, each rendered as the chat template renders it when
that turn is generated (data.multi_turn_mode).

Sample k holds the messages up to and including assistant turn k, rendered on their own: the history is exactly
the text a model sees at inference before it writes turn k, also where the template rewrites earlier turns once
later ones follow (Qwen3 strips old <think> blocks). Only turn k is supervised (reply and end-of-turn marker), by a
renderer that supervises the last assistant turn; earlier turns are context, so each turn is supervised once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ift_dist.config import DataConfig
from ift_dist.config.choices import MultiTurnMode, Supervise
from ift_dist.data.contracts import Conversation, Dropped, RenderedSample, TurnSamples


def applies(cfg: DataConfig) -> bool:
    """Whether conversations may become per-turn samples: last_assistant already supervises one turn per sample,
    and "all" would train the shared history once per turn."""
    return cfg.supervise == Supervise.assistant and cfg.multi_turn_mode != MultiTurnMode.whole


def turn_config(cfg: DataConfig) -> DataConfig:
    """The data config of the renderer that renders one turn's sample: the last assistant turn supervised."""
    return dataclasses.replace(cfg, supervise=Supervise.last_assistant, multi_turn_mode=MultiTurnMode.whole)


def render_turns(
    conversation: Conversation, render_last: Callable[[Conversation], RenderedSample | Dropped]
) -> TurnSamples:
    """One sample per assistant turn, in order; `render_last` renders a conversation supervising its last assistant
    turn. A turn that gives no sample is in `dropped`, its detail naming the turn."""
    messages = conversation.messages
    turns = [index for index, message in enumerate(messages) if message.role == "assistant"]
    result = TurnSamples(samples=[])
    for number, turn in enumerate(turns):
        sample = render_last(dataclasses.replace(conversation, messages=messages[: turn + 1]))
        if isinstance(sample, RenderedSample) and (sample.dropped_turns or (sample.truncated and number > 0)):
            # Fitting data.max_length fell back to an earlier turn (the renderer's rule for whole conversations);
            # that turn has a sample of its own, so this one would supervise it twice.
            sample = Dropped(
                conversation.ref, "too_long", "with its history it is longer than data.max_length"
            )
        if isinstance(sample, Dropped):
            where = f"assistant turn {number} (message {turn})"
            result.dropped.append(Dropped(conversation.ref, sample.reason, f"{where}: {sample.detail}"))
        else:
            result.samples.append(sample)
    return result
