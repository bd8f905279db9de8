"""Balancing: groups records (by source, category or near-duplicate cluster), caps each group at a seeded random
subset and gives each group's records a weight multiplier.

Which records of an over-full group stay is decided by a per-record rank, a blake2b digest of (seed, record ref):
a group keeps its `max_per_group` records of lowest rank. A record's rank does not depend on any other record, so
the kept set depends only on the seed and on which records form the group, never on their order, on how the input
was chunked, or on the number of workers.

Category of a record: its own `category` field when it has one, else the first verb of its instruction, which is
how Self-Instruct grouped instructions. Without a part-of-speech tagger (the grouping must not change with what
happens to be installed) the "verb" is a documented heuristic, `instruction_verb`: the first word of the
instruction, lower-cased, after leading politeness and request phrases ("please", "can you", "I want you to", ...)
and list numbering. Instructions are mostly imperatives, so this is the verb for "Write a poem" and "Please
explain ...", and a question word ("what", "how") for a question, which is a fair group too. For CJK text, written
without spaces, it is the first two characters after a leading 请 / 请你 / 帮我 / 你能 ... (most Chinese instruction
verbs are one or two characters: 写, 解释, 生成, 翻译), or only the first when a numeral or demonstrative follows it
(写一首诗 -> 写).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ift_dist.config.quality_schema import BalanceConfig
from ift_dist.data.contracts import SampleRef
from ift_dist.data.quality.texts import QualityText, Removal, is_cjk, normalise, words

logger = logging.getLogger(__name__)

GROUPINGS = ("source", "category", "cluster")
NO_VERB = "(none)"  # the group of an instruction with no word at all (empty, or only punctuation)

# Leading phrases skipped before the first word, longest first where one starts another. Word tuples as `words()`
# yields them from lower-cased text ("I'd" is "i", "d").
_FILLERS: tuple[tuple[str, ...], ...] = tuple(
    tuple(phrase.split())
    for phrase in (
        "i would like you to", "i d like you to", "i want you to", "i need you to", "i would like to",
        "i want to", "your task is to", "you are asked to", "you need to", "can you please", "could you please",
        "would you please", "will you please", "can you", "could you", "would you", "will you", "help me",
        "please", "kindly", "now", "then", "also", "just", "task", "instruction",
    )
)  # fmt: skip
_CJK_FILLERS = (
    "请你",
    "请您",
    "麻烦你",
    "麻烦您",
    "帮我",
    "帮忙",
    "你能",
    "您能",
    "能否",
    "能不能",
    "可以",
    "请",
)
_CJK_NUMERALS = set("一二三四五六七八九十两几这那些")
_CJK_CHAR = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


@dataclass
class BalanceResult:
    """What balancing decided. removals: the capped-out records, in input order (reason "balance");
    group_sizes / kept_sizes: records per group before / after the cap; group_weights: every group seen -> its
    multiplier (1.0 unless `weights` names it); record_weights: every kept record -> its group's multiplier, to be
    multiplied into the record's source weight by the epoch plan; unmatched_weights: groups named in `weights`
    that no record belongs to (a typo, or a group emptied by an earlier stage)."""

    removals: list[Removal] = field(default_factory=list)
    group_sizes: dict[str, int] = field(default_factory=dict)
    kept_sizes: dict[str, int] = field(default_factory=dict)
    group_weights: dict[str, float] = field(default_factory=dict)
    record_weights: dict[SampleRef, float] = field(default_factory=dict)
    unmatched_weights: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "groups": len(self.group_sizes),
            "removed": len(self.removals),
            "capped_groups": {
                group: {"records": size, "kept": self.kept_sizes[group]}
                for group, size in sorted(self.group_sizes.items())
                if self.kept_sizes[group] < size
            },
            "weights": {group: w for group, w in sorted(self.group_weights.items()) if w != 1.0},
            "unmatched_weights": self.unmatched_weights,
        }


def instruction_verb(instruction: str) -> str:
    """The heuristic "first verb" of an instruction (see the module docstring): the first word, lower-cased,
    after leading request phrases and numbering; for CJK text the first two CJK characters after a leading
    request phrase; NO_VERB when there is no word."""
    text = normalise(instruction, lowercase=True)
    if is_cjk(text):
        chars = "".join(_CJK_CHAR.findall(text))
        stripped = True
        while stripped:  # "请你帮我写" -> "写"
            stripped = False
            for filler in _CJK_FILLERS:
                if chars.startswith(filler) and len(chars) > len(filler):
                    chars, stripped = chars[len(filler) :], True
                    break
        # A numeral or demonstrative after the first character ends a one-character verb: "写一首诗" -> "写".
        return (chars[:1] if chars[1:2] in _CJK_NUMERALS else chars[:2]) or NO_VERB
    tokens = [token for token in words(text) if not token.isdigit()]  # "1. Write ..." starts with "write"
    position, skipped = 0, True
    while skipped:
        skipped = False
        for filler in _FILLERS:
            if tuple(tokens[position : position + len(filler)]) == filler and position + len(filler) < len(
                tokens
            ):
                position, skipped = position + len(filler), True
                break
    return tokens[position] if position < len(tokens) else NO_VERB


def category_of(text: QualityText) -> str:
    """The record's own category (stripped) when it has one, else `instruction_verb` of its instruction."""
    if text.category and text.category.strip():
        return text.category.strip()
    return instruction_verb(text.instruction)


def group_of(
    text: QualityText,
    by: str,
    *,
    clusters: Mapping[str | SampleRef, int] | None = None,
    source_of: Callable[[SampleRef], str] | None = None,
) -> str:
    """The group of one record. by: "source" (source_of(ref), default the ref's source name), "category"
    (category_of) or "cluster": the near-duplicate cluster id (as text) that `clusters` (ref or "source:index"
    -> cluster id) gives, else the record's own ref, a group of one."""
    if by == "source":
        return source_of(text.ref) if source_of is not None else text.ref.source
    if by == "category":
        return category_of(text)
    if by == "cluster":
        cluster = _cluster_of(text.ref, clusters or {})
        return str(text.ref) if cluster is None else str(cluster)
    raise ValueError(f"balance: group by one of {', '.join(GROUPINGS)}, got {by!r}")


def _cluster_of(ref: SampleRef, clusters: Mapping[str | SampleRef, int]) -> int | None:
    found = clusters.get(ref)
    return clusters.get(str(ref)) if found is None else found


def selection_rank(seed: int, ref: SampleRef) -> bytes:
    """A record's place in the seeded random order that caps keep from: depends on nothing but seed and ref."""
    return hashlib.blake2b(f"{seed}:{ref}".encode(), digest_size=8).digest()


def balance(
    texts: Sequence[QualityText],
    cfg: BalanceConfig,
    *,
    seed: int,
    clusters: Mapping[str | SampleRef, int] | None = None,
    source_of: Callable[[SampleRef], str] | None = None,
) -> BalanceResult:
    """Groups `texts` by cfg.by, keeps at most cfg.max_per_group records of each (those of lowest
    `selection_rank`; 0 = no cap) and weighs every kept record by cfg.weights of its group (1.0 if unlisted).
    With cfg.by empty nothing is grouped: nothing is removed and every record weighs 1."""
    result = BalanceResult()
    if not cfg.by:
        result.record_weights = {text.ref: 1.0 for text in texts}
        return result
    groups = [group_of(text, cfg.by, clusters=clusters, source_of=source_of) for text in texts]
    sizes = Counter(groups)
    cap = cfg.max_per_group
    dropped: set[SampleRef] = set()
    if cap:
        members: dict[str, list[SampleRef]] = {}
        for text, group in zip(texts, groups, strict=True):
            if sizes[group] > cap:
                members.setdefault(group, []).append(text.ref)
        for refs in members.values():
            dropped.update(sorted(refs, key=lambda ref: selection_rank(seed, ref))[cap:])
    result.group_sizes = dict(sorted(sizes.items()))
    result.kept_sizes = {group: min(size, cap) if cap else size for group, size in result.group_sizes.items()}
    result.group_weights = {group: float(cfg.weights.get(group, 1.0)) for group in result.group_sizes}
    result.unmatched_weights = sorted(set(cfg.weights) - set(sizes))
    if result.unmatched_weights:
        logger.warning(
            "data.quality.balance.weights: no record is in group(s) %s (by %s)",
            result.unmatched_weights,
            cfg.by,
        )
    for text, group in zip(texts, groups, strict=True):
        if text.ref in dropped:
            detail = f"by {cfg.by}: group {group!r} has {sizes[group]} records, cap {cap}"
            result.removals.append(Removal(text.ref, "balance", None, detail))
        else:
            result.record_weights[text.ref] = result.group_weights[group]
    return result
