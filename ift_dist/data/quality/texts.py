"""What the quality stages look at: a Conversation as texts (QualityText), why a record was removed (Removal), and
the text normalisation and shingling that dedup and decontamination share."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from ift_dist.data.contracts import Conversation, SampleRef

# CJK ideographs, kana and Hangul: text written without spaces between words, shingled by characters.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_WORD = re.compile(r"\w+", re.UNICODE)
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class QualityText:
    """One valid record as text. prompt: the user turns; answer: the assistant turns (each joined by a blank
    line); conversation: every message as "role: content", system included; instruction: the first user turn
    (for an Alpaca record its instruction without the input)."""

    ref: SampleRef
    prompt: str
    answer: str
    conversation: str
    instruction: str
    category: str | None = None

    @classmethod
    def of(cls, conversation: Conversation) -> QualityText:
        users = [m for m in conversation.messages if m.role == "user"]
        answers = [m.content for m in conversation.messages if m.role == "assistant" and m.content]
        first = users[0] if users else None
        instruction = (first.alpaca[0] if first.alpaca else first.content) if first else ""
        return cls(
            ref=conversation.ref,
            prompt="\n\n".join(m.content for m in users),
            answer="\n\n".join(answers),
            conversation="\n\n".join(f"{m.role}: {m.content}" for m in conversation.messages),
            instruction=instruction,
            category=conversation.category,
        )

    def key(self, which: str) -> str:
        """The text compared by dedup and decontamination: "prompt" (system and user turns are what is asked; the
        system prompt is left out, as it is usually shared) or "conversation"."""
        return self.prompt if which == "prompt" else self.conversation


@dataclass(frozen=True)
class Removal:
    """A record left out by a quality stage. reason: duplicate, near_duplicate, contaminated, filter:<rule>,
    low_score or balance; matched: the record kept instead (a SampleRef as text) or the evaluation item found
    (e.g. "mmlu/test/anatomy:12"); detail: the numbers behind the decision."""

    ref: SampleRef
    reason: str
    matched: str | None = None
    detail: str = ""

    def to_json(self) -> dict[str, str | None]:
        return {"ref": str(self.ref), "reason": self.reason, "matched": self.matched, "detail": self.detail}


def normalise(text: str, *, lowercase: bool = True) -> str:
    """Unicode NFKC (full-width and compatibility forms folded), whitespace runs collapsed to one space, trimmed,
    lower-cased if asked: the form exact duplicates are compared in."""
    text = _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()
    return text.lower() if lowercase else text


def is_cjk(text: str, share: float = 0.3) -> bool:
    """Whether `text` is mostly written without spaces: CJK characters make up at least `share` of its letters."""
    letters = sum(ch.isalpha() for ch in text)
    return letters > 0 and len(_CJK.findall(text)) / letters >= share


def words(text: str) -> list[str]:
    """Word tokens of normalised text (runs of letters, digits and underscore); punctuation is not a word."""
    return _WORD.findall(text)


def shingles(text: str, *, word_ngram: int, char_ngram: int, lowercase: bool = True) -> set[str]:
    """The shingle set of a text: word n-grams, or character n-grams (spaces removed) for CJK text. A text shorter
    than one n-gram is a single shingle of all it has, so short texts still compare."""
    text = normalise(text, lowercase=lowercase)
    if is_cjk(text):
        chars = "".join(text.split())
        n = char_ngram
        return {chars[i : i + n] for i in range(max(1, len(chars) - n + 1))} if chars else set()
    tokens = words(text)
    n = word_ngram
    return {" ".join(tokens[i : i + n]) for i in range(max(1, len(tokens) - n + 1))} if tokens else set()
