"""Rule-based quality filters: the first rule (in RULES order) that a record fails, as a `filter:<rule>` Removal.

The rules, in the order they are tried (a record is reported under the first one it fails, so the order is part of
the output and fixed):

    prompt_chars, answer_chars      characters of QualityText.prompt / .answer outside [min, max]
    prompt_tokens, answer_tokens    the same in tokens of data.tokenizer, counted without special tokens or template
    answer_prompt_ratio             answer characters / prompt characters outside [min, max] (an empty prompt: inf)
    refusal                         REFUSAL_PATTERNS (when `refusal`) and `refusal_patterns` found in the answer
    alpaca_blacklist                Stanford Alpaca's blacklisted words in the instruction, or "Write a program" first
    alpaca_punctuation              the instruction starts with ASCII punctuation
    alpaca_non_ascii                the instruction starts with a non-ASCII character (CJK text is not judged)
    alpaca_length                   instruction words <= alpaca_min_words or > alpaca_max_words
    language_mismatch               langdetect's primary language of the prompt differs from the answer's (code
                                    blocks removed; short or uncertain texts are not judged: `language_of`)
    repetition                      some answer n-gram occurs more than max_repeats times
    unbalanced_code                 an odd number of ``` fence markers in the answer
    empty_answer                    the answer is empty after stripping, or a placeholder (PLACEHOLDERS)

The Alpaca rules follow tatsu-lab/stanford_alpaca generate_instruction.py (`post_process_gpt3_response`), which
dropped generated instructions with `len(inst.split()) <= 3 or > 150`, a blacklisted word (regex word boundaries,
any case), a start with "Write a program", with `string.punctuation` or with a non-ASCII character. We keep its
boundaries: drop when words <= alpaca_min_words (default 3) or words > alpaca_max_words (default 150). Words are
`str.split()` tokens, as Alpaca's, for text without CJK characters; text with them (written without spaces) counts
one word per CJK character plus the other space-separated tokens holding a letter or digit: "道歉。" is 2 words.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from ift_dist.config.checks import ConfigError
from ift_dist.config.quality_schema import FilterConfig
from ift_dist.data.quality.texts import QualityText, Removal, is_cjk, normalise, words

RULES = (
    "prompt_chars", "answer_chars", "prompt_tokens", "answer_tokens", "answer_prompt_ratio", "refusal",
    "alpaca_blacklist", "alpaca_punctuation", "alpaca_non_ascii", "alpaca_length", "language_mismatch",
    "repetition", "unbalanced_code", "empty_answer",
)  # fmt: skip

# Refusals and assistant boilerplate, searched case-insensitively in the normalised answer (NFKC, so a full-width
# comma is ","; whitespace runs are one space; lower case). Deliberately few: each phrase is one that a useful answer
# rarely contains; "我无法" ("I cannot") is the broadest, and in the Chinese Alpaca-GPT4 demo set it marks refusals
# and answers to questions missing their input.
REFUSAL_PATTERNS = (
    r"\bas an ai (language )?model\b",
    r"\bas a (large )?language model\b",
    r"\bi['’]?m sorry,? but i (cannot|can['’]?t)\b",
    r"\bi (cannot|can['’]?t) (help|assist|provide)\b",
    r"\bi( am|['’]?m) unable to\b",
    r"作为一?个?(大型)?(人工智能|ai)(语言)?模型",
    r"作为一?个?(大型)?语言模型",
    r"我无法",
    r"(抱歉|对不起),\s?我不能",
)

# Stanford Alpaca's blacklist (generate_instruction.py): tasks a text-only model cannot do (see, draw, browse).
ALPACA_BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot",
    "go to", "video", "audio", "music", "flowchart", "diagram",
)  # fmt: skip
# Alpaca also dropped instructions starting with this (case-sensitive): ambiguous between "write code" and "answer".
ALPACA_BAD_START = "Write a program"

# Answers that stand for no answer, compared with the normalised answer (NFKC folds "…" into "...", lower case).
PLACEHOLDERS = frozenset({"<noinput>", "n/a", "na", "none", "todo", "...", "…", "null", "无", "暂无"})

# Texts with fewer letters than this are not language-judged: langdetect guesses wildly on a few words.
LANGUAGE_MIN_LETTERS = 20
# A language langdetect gives less probability than this is not judged: on short lists of names or single phrases it
# answers e.g. "id" or "so" with about 0.86.
LANGUAGE_MIN_PROBABILITY = 0.9
# Only the start of a long text is language-detected: enough for a stable verdict, and bounded time per record.
LANGUAGE_MAX_CHARS = 2000

_CODE_BLOCK = re.compile(r"```.*?(```|$)", re.DOTALL)
_FENCE = re.compile(r"`{3,}")


def active_rules(cfg: FilterConfig) -> list[str]:
    """The rules `cfg` turns on, in RULES order (for reports)."""
    on = {
        "prompt_chars": bool(cfg.min_prompt_chars or cfg.max_prompt_chars),
        "answer_chars": bool(cfg.min_answer_chars or cfg.max_answer_chars),
        "prompt_tokens": bool(cfg.min_prompt_tokens or cfg.max_prompt_tokens),
        "answer_tokens": bool(cfg.min_answer_tokens or cfg.max_answer_tokens),
        "answer_prompt_ratio": bool(cfg.min_answer_prompt_ratio or cfg.max_answer_prompt_ratio),
        "refusal": cfg.refusal or bool(cfg.refusal_patterns),
        "alpaca_blacklist": cfg.alpaca_heuristics,
        "alpaca_punctuation": cfg.alpaca_heuristics,
        "alpaca_non_ascii": cfg.alpaca_heuristics,
        "alpaca_length": cfg.alpaca_heuristics,
        "language_mismatch": cfg.language_mismatch,
        "repetition": bool(cfg.repetition_ngram and cfg.max_repeats),
        "unbalanced_code": cfg.unbalanced_code,
        "empty_answer": cfg.empty_answer,
    }
    return [rule for rule in RULES if on[rule]]


def compile_patterns(patterns: Sequence[str], key: str) -> list[re.Pattern[str]]:
    """`patterns` compiled case-insensitively; a bad one raises ConfigError naming `key[i]`."""
    compiled = []
    for index, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as exc:
            raise ConfigError(f"{key}[{index}]: not a regular expression ({exc}): {pattern!r}") from None
    return compiled


class Filters:
    """The configured rules, compiled once; `check` is called for every record."""

    def __init__(self, cfg: FilterConfig, tokenizer: Any = None, *, key: str = "data.quality.filters"):
        self.cfg = cfg
        self.rules = active_rules(cfg)
        if {"prompt_tokens", "answer_tokens"} & set(self.rules) and tokenizer is None:
            raise ConfigError(f"{key}: token bounds need a tokenizer (data.tokenizer)")
        self._tokenizer = tokenizer
        builtin = list(REFUSAL_PATTERNS) if cfg.refusal else []
        self._refusals = compile_patterns(builtin, "REFUSAL_PATTERNS") + compile_patterns(
            cfg.refusal_patterns, f"{key}.refusal_patterns"
        )
        blacklist = [*ALPACA_BLACKLIST, *cfg.alpaca_blacklist]
        # Whole words, any case, as Alpaca's find_word_in_string; a space inside a phrase matches any whitespace.
        self._blacklist = [
            (word, re.compile(r"\b" + r"\s+".join(map(re.escape, word.split())) + r"\b", re.IGNORECASE))
            for word in blacklist
            if word.strip()
        ]
        self._checks: list[tuple[str, Callable[[QualityText], str | None]]] = [
            (rule, getattr(self, f"_{rule}")) for rule in self.rules
        ]

    def check(self, text: QualityText) -> Removal | None:
        """The first rule `text` fails, as Removal(reason="filter:<rule>", detail=measured vs threshold)."""
        for rule, failed in self._checks:  # empty when no rule is on: nothing is computed
            detail = failed(text)
            if detail is not None:
                return Removal(text.ref, f"filter:{rule}", None, detail)
        return None

    # --- lengths -------------------------------------------------------------------------------------------
    def _prompt_chars(self, text: QualityText) -> str | None:
        return _outside(len(text.prompt), self.cfg.min_prompt_chars, self.cfg.max_prompt_chars, "chars")

    def _answer_chars(self, text: QualityText) -> str | None:
        return _outside(len(text.answer), self.cfg.min_answer_chars, self.cfg.max_answer_chars, "chars")

    def _prompt_tokens(self, text: QualityText) -> str | None:
        count = self._count_tokens(text.prompt)
        return _outside(count, self.cfg.min_prompt_tokens, self.cfg.max_prompt_tokens, "tokens")

    def _answer_tokens(self, text: QualityText) -> str | None:
        count = self._count_tokens(text.answer)
        return _outside(count, self.cfg.min_answer_tokens, self.cfg.max_answer_tokens, "tokens")

    def _count_tokens(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _answer_prompt_ratio(self, text: QualityText) -> str | None:
        ratio = len(text.answer) / len(text.prompt) if text.prompt else float("inf")
        low, high = self.cfg.min_answer_prompt_ratio, self.cfg.max_answer_prompt_ratio
        if low and ratio < low:
            return f"ratio {ratio:.3g} < min {low:g}"
        if high and ratio > high:
            return f"ratio {ratio:.3g} > max {high:g}"
        return None

    # --- content -------------------------------------------------------------------------------------------
    def _refusal(self, text: QualityText) -> str | None:
        answer = normalise(text.answer)
        for pattern in self._refusals:
            match = pattern.search(answer)
            if match:
                return f"{match.group(0)!r} matches /{pattern.pattern}/"
        return None

    def _alpaca_blacklist(self, text: QualityText) -> str | None:
        instruction = text.instruction.strip()
        if instruction.startswith(ALPACA_BAD_START):
            return f"starts with {ALPACA_BAD_START!r}"
        for word, pattern in self._blacklist:
            if pattern.search(instruction):
                return f"blacklisted word {word!r}"
        return None

    def _alpaca_punctuation(self, text: QualityText) -> str | None:
        instruction = text.instruction.strip()
        if instruction and instruction[0] in string.punctuation:
            return f"starts with {instruction[0]!r}"
        return None

    def _alpaca_non_ascii(self, text: QualityText) -> str | None:
        instruction = text.instruction.strip()
        # Alpaca generated English only; a Chinese (or Japanese, Korean) instruction starts non-ASCII by nature, and
        # one that starts with a CJK character is CJK text even when English names outnumber its characters.
        if (
            instruction
            and not instruction[0].isascii()
            and not (is_cjk(instruction) or is_cjk(instruction[0]))
        ):
            return f"starts with {instruction[0]!r} (U+{ord(instruction[0]):04X})"
        return None

    def _alpaca_length(self, text: QualityText) -> str | None:
        count = instruction_words(text.instruction)
        low, high = self.cfg.alpaca_min_words, self.cfg.alpaca_max_words
        if count <= low:
            return f"{count} words <= min {low}"
        if high and count > high:
            return f"{count} words > max {high}"
        return None

    def _language_mismatch(self, text: QualityText) -> str | None:
        prompt, answer = language_of(text.prompt), language_of(text.answer)
        if prompt and answer and prompt != answer:
            return f"prompt {prompt} != answer {answer}"
        return None

    def _repetition(self, text: QualityText) -> str | None:
        n, limit = self.cfg.repetition_ngram, self.cfg.max_repeats
        gram, count = most_repeated_ngram(text.answer, n)
        if count > limit:
            return f"{gram!r} x{count} > max {limit}"
        return None

    def _unbalanced_code(self, text: QualityText) -> str | None:
        count = len(_FENCE.findall(text.answer))
        return f"{count} ``` fences (odd)" if count % 2 else None

    def _empty_answer(self, text: QualityText) -> str | None:
        answer = normalise(text.answer)
        if not answer:
            return "empty"
        return f"placeholder {answer!r}" if answer in PLACEHOLDERS else None


def _outside(value: int, low: int, high: int, unit: str) -> str | None:
    if low and value < low:
        return f"{value} {unit} < min {low}"
    if high and value > high:
        return f"{value} {unit} > max {high}"
    return None


def instruction_words(instruction: str) -> int:
    """Alpaca's word count, `len(instruction.split())`, for text without CJK characters. With CJK characters (written
    without spaces): one word per CJK character, plus the space-separated tokens of the rest that hold a letter or
    digit (so "道歉。" is 2 words, "使用Adobe Illustrator创建标志" 8)."""
    cjk = [is_cjk(ch) for ch in instruction]
    if not any(cjk):
        return len(instruction.split())
    rest = "".join(" " if is_char_cjk else ch for ch, is_char_cjk in zip(instruction, cjk, strict=True))
    return sum(cjk) + sum(any(ch.isalnum() for ch in token) for token in rest.split())


def most_repeated_ngram(answer: str, n: int) -> tuple[str, int]:
    """The most frequent n-gram of the normalised answer and its count (ties: the first to appear). Words for
    spaced text; characters for CJK text (letters and digits), as the dedup shingles use characters."""
    text = normalise(answer)
    cjk = is_cjk(text)
    # CJK: letters and digits only, so markdown runs ("**", "---") between characters do not count as repeats.
    tokens = [ch for ch in text if ch.isalnum()] if cjk else words(text)
    joiner = "" if cjk else " "
    counts = Counter(joiner.join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return counts.most_common(1)[0] if counts else ("", 0)


def language_of(text: str) -> str | None:
    """langdetect's primary language code ("zh" for zh-cn and zh-tw), seeded so a text always gets the same one;
    None when too short to judge (under LANGUAGE_MIN_LETTERS letters once code blocks are removed), undetectable or
    uncertain (top probability under LANGUAGE_MIN_PROBABILITY)."""
    from langdetect.lang_detect_exception import LangDetectException

    # Code is not natural language: an English question answered with a Python block would read as mismatched.
    prose = _CODE_BLOCK.sub(" ", text)[:LANGUAGE_MAX_CHARS]
    if sum(ch.isalpha() for ch in prose) < LANGUAGE_MIN_LETTERS:
        return None
    detector = _detector_factory().create()
    detector.append(prose)
    try:
        best = detector.get_probabilities()[0]
    except (LangDetectException, IndexError):
        return None
    return best.lang.split("-")[0] if best.prob >= LANGUAGE_MIN_PROBABILITY else None


@functools.cache
def _detector_factory() -> Any:
    """A langdetect factory of our own with seed 0 (langdetect samples n-grams at random; unseeded, a verdict can
    change between runs), leaving the library's global factory alone."""
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.set_seed(0)
    return factory
