"""Renders a Conversation into token ids with assistant-only labels, through the run's chat template.

The whole conversation is rendered once by the tokenizer's `apply_chat_template` and tokenized once, so the ids are
exactly what the model sees at inference. Assistant spans are found by prefix diffing, which needs no
`{% generation %}` tags: the reply of assistant turn i is the text between the rendering of messages[:i] with the
generation prompt and the rendering of messages[:i + 1]. It is supervised up to and including its end-of-turn marker
(the special token(s) that close it, e.g. <|im_end|>); what the template emits after the marker is not. Labels are
mapped onto tokens by character offsets. A template that renders an earlier turn differently once later turns
follow cannot be masked this way: such a sample is dropped ("template_not_prefix_stable"), never mis-masked, or
rendered as one sample per assistant turn (data.multi_turn_mode, ift_dist/data/per_turn.py).
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ift_dist.config import DataConfig
from ift_dist.config.choices import MultiTurnMode
from ift_dist.data import per_turn, text_source, tool_text
from ift_dist.data.contracts import (
    IGNORE_INDEX,
    Conversation,
    Dropped,
    RenderedSample,
    TextDocument,
    TextSamples,
    TurnSamples,
)
from ift_dist.data.templates import end_of_turn_marker, resolve_chat_template, template_spec

log = logging.getLogger(__name__)


def load_tokenizer(path: str) -> Any:
    """A fast Hugging Face tokenizer from a local directory or hub id (fast: labels need character offsets)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.fspath(path))
    if not tokenizer.is_fast:
        raise ValueError(
            f"tokenizer {path!r} has no fast (Rust) version; rendering needs its character offsets"
        )
    return tokenizer


def pad_token_id(tokenizer: Any) -> int:
    """The id that fills padding (packed rows, batched generation): the tokenizer's pad token, else its
    end-of-sequence token, else 0. Padding carries no label and is masked out, so any id would do; these are the
    ones a model has embeddings for."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return 0


def _common_prefix_length(first: str, second: str) -> int:
    length = min(len(first), len(second))
    if first[:length] == second[:length]:  # the usual case, without a Python loop
        return length
    return next((index for index in range(length) if first[index] != second[index]), length)


class _TemplateFailure(Exception):
    """The chat template raised while rendering (e.g. its own role-alternation check)."""


@dataclass(frozen=True)
class _Span:
    """Supervised characters [start, end) of one assistant turn in the rendered text."""

    start: int
    end: int


class Renderer:
    """Conversation -> RenderedSample (or Dropped) for one tokenizer and DataConfig.

    Holds counters in `stats` (per process): samples, dropped:<reason>, straddling_tokens (tokens that cross a
    supervised span's boundary; supervised whole), turns_without_end_marker, dropped_turns, truncated,
    per_turn_conversations and per_turn_samples (data.multi_turn_mode),
    system_not_rendered, reply_not_rendered_verbatim, unprompted_replies, text_documents and text_chunks (format
    text). Picklable (the tokenizer pickles), so it can go to DataLoader workers."""

    def __init__(self, tokenizer: Any, cfg: DataConfig):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "Renderer needs a fast tokenizer (character offsets); load it with load_tokenizer()"
            )
        self.tokenizer = tokenizer
        self.cfg = cfg
        # The template the exported tokenizer must carry (tokenizer.chat_template = renderer.chat_template). None when
        # every source is raw text: nothing is rendered with it, so a base model's tokenizer without one is fine.
        text_only = text_source.only_text(cfg)
        self.chat_template = None if text_only else resolve_chat_template(tokenizer, cfg)
        if text_source.has_text(cfg):
            text_source.end_of_document_id(tokenizer)  # a tokenizer without EOS fails here, not in a worker
        spec = template_spec(cfg)
        self._alpaca_fields = spec is not None and spec.user_with_input is not None
        markers = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
        markers.update(tokenizer.all_special_tokens)
        if spec is not None and (marker := end_of_turn_marker(spec, tokenizer)):
            markers.add(marker)
            if len(tokenizer.encode(marker, add_special_tokens=False)) != 1:
                log.warning(
                    "end-of-turn marker %r of data.template %r is not one token of tokenizer %r: generation will "
                    "not stop on it unless it is added as a special token",
                    marker,
                    cfg.template,
                    getattr(tokenizer, "name_or_path", ""),
                )
        # Longest first, so "<|endoftext|>" is not mistaken for a shorter token that ends it.
        self._markers = sorted((marker for marker in markers if marker), key=len, reverse=True)
        self.stats: Counter[str] = Counter()
        # What the template renders of tool calls, tool schemas and system messages (data.tool_fallback).
        self._abilities = None if text_only else tool_text.probe(self._apply)
        # data.multi_turn_mode: per-turn samples come from a renderer that supervises the last turn only. It shares
        # these counters, so what it finds in the samples it renders (straddling tokens, ...) is counted here.
        self._turn_renderer: Renderer | None = None
        if per_turn.applies(cfg):
            self._turn_renderer = Renderer(tokenizer, per_turn.turn_config(cfg))
            self._turn_renderer.stats = self.stats

    # ----------------------------------------------------------------------------------------- public

    def render(
        self, conversation: Conversation | TextDocument
    ) -> RenderedSample | TurnSamples | TextSamples | Dropped:
        """Token ids and labels of one conversation, or of each of its assistant turns (data.multi_turn_mode);
        Dropped when it cannot become a correct sample. A TextDocument (format text) becomes its chunks, without
        the template (ift_dist/data/text_source.py)."""
        if isinstance(conversation, TextDocument):
            chunks = text_source.render_document(conversation, self.tokenizer, self.cfg.max_length)
            self.stats.update(samples=len(chunks.samples), text_documents=1, text_chunks=len(chunks.samples))
            return chunks
        if self._turn_renderer is not None and self.cfg.multi_turn_mode == MultiTurnMode.per_turn:
            result = self._render_turns(conversation, None)
        else:
            counted = self.stats.copy()
            result = self._attempt(conversation)
            if (
                self._turn_renderer is not None
                and isinstance(result, Dropped)
                and result.reason == "template_not_prefix_stable"
            ):
                # auto: the template rewrites history. What the whole attempt counted is not what is trained.
                self.stats.clear()
                self.stats.update(counted)
                result = self._render_turns(conversation, result)
        if isinstance(result, TurnSamples):
            samples, dropped = result.samples, result.dropped
            self.stats["per_turn_conversations"] += 1
            self.stats["per_turn_samples"] += len(samples)
        else:
            samples, dropped = ([], [result]) if isinstance(result, Dropped) else ([result], [])
        for drop in dropped:
            self.stats[f"dropped:{drop.reason}"] += 1
        for sample in samples:
            self.stats["samples"] += 1
            self.stats["dropped_turns"] += sample.dropped_turns
            self.stats["truncated"] += int(sample.truncated)
        return result

    def generation_prompt(self, user_message: str) -> str:
        """The text a model trained on these samples is prompted with for one user message: the run's chat template
        (with data.system_prompt's rule) and variables, ending in the generation prompt, as training renders the
        prompt of a reply. Text-only data (no chat template) trains plain continuation: the message itself."""
        if self.chat_template is None:
            return user_message
        return self._apply([{"role": "user", "content": user_message}], None, add_generation_prompt=True)

    # ----------------------------------------------------------------------------------------- steps

    def _attempt(self, conversation: Conversation) -> RenderedSample | Dropped:
        try:
            return self._render(conversation)
        except _TemplateFailure as error:
            return Dropped(conversation.ref, "template_error", str(error))

    def _render_turns(self, conversation: Conversation, whole: Dropped | None) -> TurnSamples | Dropped:
        """One sample per assistant turn; when no turn gives one, the whole conversation's drop (auto) or the first
        turn's (per_turn)."""
        turns = per_turn.render_turns(conversation, self._turn_renderer._attempt)
        if turns.samples:
            if whole is not None and not self.stats["per_turn_conversations"]:
                log.warning(
                    "the chat template renders earlier turns differently once later turns follow (%s): such "
                    "conversations become one sample per assistant turn (data.multi_turn_mode auto); counted in "
                    "the data report as per_turn_conversations",
                    whole.detail[:160],
                )
            return turns
        first = turns.dropped[0] if turns.dropped else None
        return whole or first or Dropped(conversation.ref, "nothing_supervised", "no assistant turn")

    def _render(self, conversation: Conversation) -> RenderedSample | Dropped:
        messages = [self._message_dict(message) for message in conversation.messages]
        assistant_turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
        if not assistant_turns:
            return Dropped(conversation.ref, "nothing_supervised", "no assistant turn")
        # Messages after the last reply carry no loss: they would only take room.
        messages = messages[: assistant_turns[-1] + 1]
        tools = conversation.tools
        if self.cfg.tool_fallback == "text" and (
            tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        ):
            messages, tools = tool_text.as_text(messages, tools, self._abilities)

        text = self._apply(messages, tools)
        ids, offsets = self._tokenize(text)
        total = len(messages)
        kept, truncated = total, False
        if len(ids) > self.cfg.max_length:
            fitted = self._fit(messages, tools, text, offsets, assistant_turns)
            if fitted is None:
                first = assistant_turns[0] + 1
                text = self._apply(messages[:first], tools)
                ids, offsets = self._tokenize(text)
                if self.cfg.overlong == "drop":
                    return Dropped(
                        conversation.ref,
                        "too_long",
                        f"the first exchange alone is {len(ids)} tokens > data.max_length {self.cfg.max_length}",
                    )
                kept, truncated = first, True
            else:
                kept, text, ids, offsets = fitted
        messages = messages[:kept]
        if messages[0]["role"] == "system" and messages[0]["content"].strip() not in text:
            # e.g. Phi-3's template ignores system messages: train and inference agree, but the user should know.
            self._note_once("system_not_rendered", "the chat template does not render the system message")

        if self.cfg.supervise == "all":
            labels = list(ids)
            labels[0] = IGNORE_INDEX  # the first token is never a target
        else:
            spans = self._assistant_spans(messages, tools, text, conversation)
            if isinstance(spans, Dropped):
                return spans
            labels = self._labels(ids, offsets, spans)
        if truncated:
            ids, labels = ids[: self.cfg.max_length], labels[: self.cfg.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            reason = "too_long" if truncated else "nothing_supervised"
            return Dropped(conversation.ref, reason, "no supervised token left")
        return RenderedSample(
            input_ids=list(ids),
            labels=labels,
            ref=conversation.ref,
            dropped_turns=total - kept,
            truncated=truncated,
        )

    def _fit(
        self,
        messages: list[dict[str, Any]],
        tools: Any,
        text: str,
        offsets: list[tuple[int, int]],
        assistant_turns: list[int],
    ) -> tuple[int, str, list[int], list[tuple[int, int]]] | None:
        """The longest conversation that ends at an assistant turn and fits max_length: (message count, text,
        ids, offsets), re-rendered and re-tokenized; None if not even the first exchange fits."""
        starts = [start for start, _ in offsets]
        for turn in reversed(assistant_turns[:-1]):
            shorter = self._apply(messages[: turn + 1], tools)
            # A cheap lower bound from the full tokenization skips re-tokenizing candidates far too long.
            if (
                text.startswith(shorter)
                and bisect.bisect_left(starts, len(shorter)) > self.cfg.max_length + 1
            ):
                continue
            ids, shorter_offsets = self._tokenize(shorter)
            if len(ids) <= self.cfg.max_length:
                return turn + 1, shorter, ids, shorter_offsets
        return None

    def _assistant_spans(
        self, messages: list[dict[str, Any]], tools: Any, text: str, conversation: Conversation
    ) -> list[_Span] | Dropped:
        turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
        if self.cfg.supervise == "last_assistant":
            turns = turns[-1:]
        spans = []
        for turn in turns:
            if turn == 0:
                # A reply that opens the conversation has no prompt to condition on (and an empty conversation
                # cannot be rendered to find its generation prompt): left unsupervised, counted.
                self.stats["unprompted_replies"] += 1
                continue
            prompt = self._apply(messages[:turn], tools, add_generation_prompt=True)
            rendered = self._apply(messages[: turn + 1], tools)
            if not rendered.startswith(prompt):
                where = max(_common_prefix_length(prompt, rendered) - 20, 0)
                return Dropped(
                    conversation.ref,
                    "template_not_prefix_stable",
                    f"message {turn}: the generation prompt ends {prompt[where:][:60]!r} but the reply renders as "
                    f"{rendered[where:][:60]!r} (a reasoning template? see data.chat_template_kwargs); "
                    + self._first_difference(prompt, rendered),
                )
            if not text.startswith(prompt):
                return Dropped(
                    conversation.ref,
                    "template_not_prefix_stable",
                    f"message {turn}: the conversation rendered up to this reply is not a prefix of the whole "
                    "rendering (the template rewrites earlier turns when later ones follow); "
                    + self._first_difference(prompt, text),
                )
            segment = rendered[len(prompt) :]
            # Only what follows an end-of-turn marker may differ from the whole rendering (e.g. an EOS that the
            # template adds after the last turn only); a difference inside the reply is a rewrite.
            stable = _common_prefix_length(segment, text[len(prompt) : len(prompt) + len(segment)])
            reply_end, marker_ends = self._split_marker(segment)
            marker_ends = [end for end in marker_ends if end <= stable]
            if stable < len(segment) and (not marker_ends or stable < reply_end):
                return Dropped(
                    conversation.ref,
                    "template_not_prefix_stable",
                    f"message {turn}: this reply renders differently when later turns follow "
                    f"({segment[:80]!r} vs {text[len(prompt) : len(prompt) + 80]!r}); "
                    + self._first_difference(rendered, text),
                )
            message = messages[turn]
            for call in message.get("tool_calls") or []:
                name = (call.get("function") or call).get("name", "")
                if name and name not in segment[:reply_end]:
                    return Dropped(
                        conversation.ref,
                        "template_drops_tool_calls",
                        f"message {turn}: the chat template does not render the call of tool {name!r}",
                    )
            if message["content"].strip() not in segment[:reply_end]:
                # e.g. a template that strips reasoning: supervised is what the template renders.
                self._note_once("reply_not_rendered_verbatim", "the chat template rewrites assistant replies")
            if marker_ends:
                supervised_end = marker_ends[-1]
            else:
                # No end-of-turn token to supervise: the reply alone, never a made-up EOS.
                self.stats["turns_without_end_marker"] += 1
                supervised_end = reply_end
            if supervised_end > 0:
                spans.append(_Span(len(prompt), len(prompt) + supervised_end))
        return spans

    def _split_marker(self, segment: str) -> tuple[int, list[int]]:
        """(reply end, end positions of the end-of-turn marker tokens, ascending) in a rendered reply. The marker
        is the run of special tokens that closes the segment, whitespace around them skipped; without one, the
        reply ends before the trailing whitespace."""
        reply_end = len(segment.rstrip())
        marker_ends = []
        while marker := next(
            (marker for marker in self._markers if segment.endswith(marker, 0, reply_end)), None
        ):
            marker_ends.append(reply_end)
            reply_end = len(segment[: reply_end - len(marker)].rstrip())
        return reply_end, marker_ends[::-1]

    def _labels(self, ids: list[int], offsets: list[tuple[int, int]], spans: list[_Span]) -> list[int]:
        labels = [IGNORE_INDEX] * len(ids)
        starts = [start for start, _ in offsets]
        ends = [end for _, end in offsets]
        for span in spans:
            first = bisect.bisect_right(ends, span.start)  # first token ending after the span starts
            last = bisect.bisect_left(starts, span.end) - 1  # last token starting before the span ends
            if first > last:
                continue
            # A token that crosses a boundary is supervised whole (the reply must be complete) and counted.
            self.stats["straddling_tokens"] += int(starts[first] < span.start) + int(ends[last] > span.end)
            labels[first : last + 1] = ids[first : last + 1]
        return labels

    # ----------------------------------------------------------------------------------------- helpers

    def _message_dict(self, message: Any) -> dict[str, Any]:
        out = message.to_dict()
        if self._alpaca_fields and message.alpaca is not None and message.alpaca[1]:
            out["instruction"], out["input"] = message.alpaca
        return out

    def _apply(self, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **self.cfg.chat_template_kwargs,
            )
        # A template may raise anything: its own raise_exception, a TypeError on input it does not expect, ...
        except Exception as error:
            raise _TemplateFailure(f"{type(error).__name__}: {error}") from error

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # Exactly how apply_chat_template(tokenize=True) tokenizes: the template writes the special tokens itself.
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return encoding["input_ids"], encoding["offset_mapping"]

    def _first_difference(self, first: str, second: str) -> str:
        """Where two renderings of the same conversation part, in tokens of the first and in characters: what
        `ift data validate` shows for a template_not_prefix_stable drop."""
        first_ids, _ = self._tokenize(first)
        second_ids, _ = self._tokenize(second)
        pairs = zip(first_ids, second_ids, strict=False)  # lengths differ: one rendering goes on
        token = next(
            (index for index, (a, b) in enumerate(pairs) if a != b), min(len(first_ids), len(second_ids))
        )
        return f"first differing token {token} (character {_common_prefix_length(first, second)})"

    def _note_once(self, key: str, message: str) -> None:
        if not self.stats[key]:
            log.warning(
                "%s (data.template %r); counted in Renderer.stats[%r]", message, self.cfg.template, key
            )
        self.stats[key] += 1
