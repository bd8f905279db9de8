"""`data.quality`: the stages between validated records and rendering that remove duplicates, benchmark
contamination and low-quality records, and cap or reweight groups (docs/data_quality.md).

Every stage is off unless configured; every removed record gets a reason (`duplicate`, `near_duplicate`,
`contaminated`, `filter:<rule>`, `low_score`, `balance`) and, where there is one, the record or benchmark item it
matched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ift_dist.config.checks import ConfigError, check_choices, check_positive
from ift_dist.config.choices import Choice


class DedupKey(Choice):
    # the whole conversation (every turn, system included), or only what the user asks (system + user turns)
    conversation = "conversation"
    prompt = "prompt"


class DecontamMethod(Choice):
    ngram = "ngram"  # a shared word n-gram (CJK: character n-gram) with a benchmark item
    minhash = "minhash"  # estimated Jaccard similarity of shingles above decontam_threshold


@dataclass
class DedupConfig:
    """Exact and near-duplicate removal; the first occurrence (by source priority, then source order) is kept."""

    # Exact duplicates of the normalised text (Unicode NFKC, whitespace collapsed, lower-cased if `lowercase`).
    exact: bool = False
    # Near-duplicates: MinHash + LSH over shingles (word n-grams; character n-grams for CJK text).
    near: bool = False
    # What is compared: conversation | prompt.
    key: DedupKey = DedupKey.conversation
    lowercase: bool = True
    # Near-duplicate when the estimated Jaccard similarity of the shingle sets is >= threshold.
    threshold: float = 0.8
    # MinHash permutations (accuracy vs memory: 4 bytes per permutation per record).
    num_perm: int = 128
    # LSH bands; 0 = chosen for the threshold by datasketch's optimiser, false negatives weighted 0.95.
    bands: int = 0
    # Shingle sizes: words for space-separated text, characters for CJK text.
    word_ngram: int = 5
    char_ngram: int = 5
    # Source names, highest priority first: across sources, a duplicate keeps the record of the earlier source here
    # (sources not listed follow in config order). Empty = config order.
    priority: list[str] = field(default_factory=list)

    def validate(self, key: str) -> None:
        check_choices(self, key)
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"{key}.threshold: a Jaccard similarity in (0, 1], got {self.threshold}")
        check_positive(f"{key}.num_perm", self.num_perm)
        check_positive(f"{key}.bands", self.bands, allow_zero=True)
        if self.bands and self.num_perm % self.bands:
            raise ConfigError(f"{key}.bands: must divide num_perm ({self.num_perm}), got {self.bands}")
        check_positive(f"{key}.word_ngram", self.word_ngram)
        check_positive(f"{key}.char_ngram", self.char_ngram)


@dataclass
class DecontamConfig:
    """How training records are matched against the evaluation sets of `data.quality.decontaminate`."""

    method: DecontamMethod = DecontamMethod.ngram
    # ngram: the n-gram length (13 words: GPT-3's and Llama's practice; CJK text uses characters).
    ngram: int = 13
    # minhash: estimated Jaccard similarity at or above which a record is contaminated.
    threshold: float = 0.8
    # What of a training record is compared: prompt (what the user asks) or conversation.
    key: DedupKey = DedupKey.prompt

    def validate(self, key: str) -> None:
        check_choices(self, key)
        check_positive(f"{key}.ngram", self.ngram)
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"{key}.threshold: a Jaccard similarity in (0, 1], got {self.threshold}")


@dataclass
class FilterConfig:
    """Rule-based quality filters; a rule is off at its default 0 / empty / false. Each drop is counted under
    `filter:<rule>`."""

    # Length bounds in characters of the prompt (all user turns) and of the answer (all assistant turns).
    min_prompt_chars: int = 0
    max_prompt_chars: int = 0
    min_answer_chars: int = 0
    max_answer_chars: int = 0
    # The same in tokens of data.tokenizer (counted without the chat template).
    min_prompt_tokens: int = 0
    max_prompt_tokens: int = 0
    min_answer_tokens: int = 0
    max_answer_tokens: int = 0
    # Answer length / prompt length (characters) bounds; 0 = off.
    min_answer_prompt_ratio: float = 0.0
    max_answer_prompt_ratio: float = 0.0
    # Refusals and boilerplate ("As an AI language model", "I cannot", "作为一个人工智能"): the built-in English and
    # Chinese patterns (regular expressions) when `refusal` is true, plus `refusal_patterns`.
    refusal: bool = False
    refusal_patterns: list[str] = field(default_factory=list)
    # Stanford Alpaca's generator heuristics on the first instruction: blacklisted words (image, graph, file, ...),
    # a start with punctuation or (English) a non-ASCII character, at most `alpaca_min_words` or more than
    # `alpaca_max_words` words (Alpaca's `<= 3 or > 150`).
    alpaca_heuristics: bool = False
    alpaca_blacklist: list[str] = field(default_factory=list)  # extra words; the built-in list always applies
    alpaca_min_words: int = 3
    alpaca_max_words: int = 150
    # Prompt and answer in different languages (langdetect, seeded; texts under 20 letters are not judged).
    language_mismatch: bool = False
    # An answer in which some word n-gram repeats more than max_repeats times (a degenerate loop); 0 = off.
    repetition_ngram: int = 0
    max_repeats: int = 0
    # Code fences (```) that do not close.
    unbalanced_code: bool = False
    # Empty, whitespace-only or placeholder answers ("<noinput>", "N/A", "TODO", "...").
    empty_answer: bool = False

    def validate(self, key: str) -> None:
        for name in (
            "min_prompt_chars", "max_prompt_chars", "min_answer_chars", "max_answer_chars", "min_prompt_tokens",
            "max_prompt_tokens", "min_answer_tokens", "max_answer_tokens", "min_answer_prompt_ratio",
            "max_answer_prompt_ratio", "alpaca_min_words", "alpaca_max_words", "repetition_ngram", "max_repeats",
        ):  # fmt: skip
            check_positive(f"{key}.{name}", getattr(self, name), allow_zero=True)
        for low, high in (
            ("min_prompt_chars", "max_prompt_chars"), ("min_answer_chars", "max_answer_chars"),
            ("min_prompt_tokens", "max_prompt_tokens"), ("min_answer_tokens", "max_answer_tokens"),
            ("min_answer_prompt_ratio", "max_answer_prompt_ratio"), ("alpaca_min_words", "alpaca_max_words"),
        ):  # fmt: skip
            if getattr(self, high) and getattr(self, low) > getattr(self, high):
                raise ConfigError(
                    f"{key}.{low}: {getattr(self, low)} is above {key}.{high} {getattr(self, high)}"
                )
        for index, pattern in enumerate(self.refusal_patterns):
            try:
                re.compile(pattern)
            except re.error as error:
                raise ConfigError(
                    f"{key}.refusal_patterns[{index}]: not a regular expression ({error}): {pattern!r}"
                ) from None
        if bool(self.repetition_ngram) != bool(self.max_repeats):
            raise ConfigError(f"{key}.repetition_ngram and {key}.max_repeats: set both or neither")


@dataclass
class ModelScoreConfig:
    """AlpaGasus-style grading: an OpenAI-compatible judge scores each (instruction, answer) 0-5; records below
    `threshold` are dropped (reason `low_score`). Cached by (model, prompt), so a rerun pays nothing again."""

    url: str = ""  # empty = off
    model: str = ""
    key_env: str = "OPENAI_API_KEY"  # the environment variable holding the API key (none for a local server)
    threshold: float = 4.5
    cache: str = ""  # the reply cache file; "" = <output_dir>/quality/score_cache.jsonl
    concurrency: int = 4
    max_tokens: int = 256

    def validate(self, key: str) -> None:
        if self.url and not self.model:
            raise ConfigError(f"{key}.model: the judge model's name is needed with {key}.url")
        if not 0 <= self.threshold <= 5:
            raise ConfigError(f"{key}.threshold: a score in 0..5 (AlpaGasus' scale), got {self.threshold}")
        check_positive(f"{key}.concurrency", self.concurrency)


@dataclass
class BalanceConfig:
    """Caps or reweights groups of records after the other stages; seeded, so the same records are kept."""

    # Group by: "" = off, "source", "category" (a record's own category field, else the first verb of the first
    # instruction, as Self-Instruct grouped), or "cluster" (near-duplicate MinHash cluster).
    by: str = ""
    # Keep at most N records of a group (a seeded random subset); 0 = no cap.
    max_per_group: int = 0
    # Per-group weights (group -> multiplier of its records, like a source weight); unlisted groups keep 1.
    weights: dict[str, float] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        if self.by not in ("", "source", "category", "cluster"):
            raise ConfigError(f"{key}.by: one of source, category, cluster (or empty), got {self.by!r}")
        check_positive(f"{key}.max_per_group", self.max_per_group, allow_zero=True)
        for group, weight in self.weights.items():
            check_positive(f"{key}.weights.{group}", weight, allow_zero=True)
        if (self.max_per_group or self.weights) and not self.by:
            raise ConfigError(f"{key}.by: name the groups that max_per_group / weights apply to")


@dataclass
class QualityConfig:
    """The quality stages, in the order they run: filters, model score, dedup, decontamination, balance."""

    filters: FilterConfig = field(default_factory=FilterConfig)
    model_score: ModelScoreConfig = field(default_factory=ModelScoreConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    # Evaluation sets no training record may contain (dropped with reason `contaminated` and the item matched): a
    # directory of them (../shared/data/eval), a benchmark directory (mmlu/, ceval/, cmmlu/), a prompt-set file
    # (MT-bench question.jsonl, IFEval input_data.jsonl, ...) or any JSONL/JSON/CSV of your own.
    decontaminate: list[str] = field(default_factory=list)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)

    def validate(self, key: str) -> None:
        self.filters.validate(f"{key}.filters")
        self.model_score.validate(f"{key}.model_score")
        self.dedup.validate(f"{key}.dedup")
        self.decontam.validate(f"{key}.decontam")
        self.balance.validate(f"{key}.balance")
