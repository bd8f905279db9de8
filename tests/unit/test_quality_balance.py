"""Balancing: exact caps, the kept subset fixed by the seed alone (not by order or chunking), weights per group and
per record, and the grouping heuristics (first verb of an instruction, clusters)."""

from __future__ import annotations

import random

import pytest

from ift_dist.config.quality_schema import BalanceConfig
from ift_dist.data.contracts import SampleRef
from ift_dist.data.quality.balance import NO_VERB, balance, group_of, instruction_verb
from ift_dist.data.quality.texts import QualityText

VERBS = ["Write", "Explain", "Summarize", "Translate"]


def text(source: str, index: int, instruction: str, category: str | None = None) -> QualityText:
    return QualityText(
        ref=SampleRef(source, index),
        prompt=instruction,
        answer=f"answer {index}",
        conversation=f"user: {instruction}",
        instruction=instruction,
        category=category,
    )


def corpus() -> list[QualityText]:
    """alpaca: 40 records (10 per verb), dolly: 7, chat: 3."""
    texts = [text("alpaca", k, f"{VERBS[k % 4]} thing number {k}.") for k in range(40)]
    texts += [
        text("dolly", k, f"Question {k}?", category="open_qa" if k < 5 else "brainstorming") for k in range(7)
    ]
    texts += [text("chat", k, f"Please write a poem about {k}") for k in range(3)]
    return texts


def kept(result, texts) -> list[SampleRef]:
    removed = {removal.ref for removal in result.removals}
    return [t.ref for t in texts if t.ref not in removed]


def test_a_cap_keeps_exactly_max_per_group_and_names_group_and_cap():
    texts = corpus()
    result = balance(texts, BalanceConfig(by="source", max_per_group=5), seed=1)
    survivors = kept(result, texts)
    assert sum(ref.source == "alpaca" for ref in survivors) == 5
    assert sum(ref.source == "dolly" for ref in survivors) == 5
    assert sum(ref.source == "chat" for ref in survivors) == 3  # under the cap: all kept
    assert len(result.removals) == 35 + 2
    assert {r.reason for r in result.removals} == {"balance"}
    alpaca = next(r for r in result.removals if r.ref.source == "alpaca")
    assert alpaca.detail == "by source: group 'alpaca' has 40 records, cap 5"
    assert result.group_sizes == {"alpaca": 40, "chat": 3, "dolly": 7}
    assert result.kept_sizes == {"alpaca": 5, "chat": 3, "dolly": 5}
    # removals come in input order
    assert [r.ref for r in result.removals] == [
        t.ref for t in texts if t.ref in {r.ref for r in result.removals}
    ]


def test_the_kept_subset_depends_on_the_seed_only_not_on_order_or_chunking():
    texts = corpus()
    cfg = BalanceConfig(by="category", max_per_group=3)
    reference = set(kept(balance(texts, cfg, seed=7), texts))
    shuffled = texts[:]
    random.Random(0).shuffle(shuffled)
    assert set(kept(balance(shuffled, cfg, seed=7), shuffled)) == reference
    # Chunks concatenated in another order (as sources visited in another priority order would be).
    chunks = [texts[:13], texts[13:29], texts[29:]]
    regrouped = chunks[2] + chunks[0] + chunks[1]
    assert set(kept(balance(regrouped, cfg, seed=7), regrouped)) == reference
    # A record's fate does not depend on records outside its group.
    only_write = [t for t in texts if group_of(t, "category") == "write"]  # with "Please write ..."
    write_kept = set(kept(balance(only_write, cfg, seed=7), only_write))
    assert write_kept == {ref for ref in reference if ref in {t.ref for t in only_write}}
    assert len(write_kept) == 3
    # Another seed draws another subset (10 choose 3 = 120 subsets per verb group: equal by chance is unlikely
    # for all four groups together).
    assert set(kept(balance(texts, cfg, seed=8), texts)) != reference


def test_weights_per_group_and_per_kept_record():
    texts = corpus()
    cfg = BalanceConfig(by="source", max_per_group=6, weights={"dolly": 2.0, "chat": 0.5, "missing": 3.0})
    result = balance(texts, cfg, seed=0)
    assert result.group_weights == {"alpaca": 1.0, "chat": 0.5, "dolly": 2.0}
    assert result.unmatched_weights == ["missing"]
    survivors = kept(result, texts)
    assert set(result.record_weights) == set(survivors)  # capped-out records get no weight
    assert all(
        result.record_weights[ref] == {"alpaca": 1.0, "chat": 0.5, "dolly": 2.0}[ref.source]
        for ref in survivors
    )
    assert result.to_json()["capped_groups"] == {
        "alpaca": {"records": 40, "kept": 6},
        "dolly": {"records": 7, "kept": 6},
    }


def test_weights_without_a_cap_remove_nothing():
    texts = corpus()
    result = balance(texts, BalanceConfig(by="source", weights={"chat": 4.0}), seed=0)
    assert result.removals == []
    assert len(result.record_weights) == len(texts)
    assert result.record_weights[SampleRef("chat", 2)] == 4.0


def test_grouping_off_keeps_everything_at_weight_one():
    texts = corpus()
    result = balance(texts, BalanceConfig(), seed=0)
    assert result.removals == [] and set(result.record_weights.values()) == {1.0}


def test_category_groups_use_the_record_category_else_the_first_verb():
    texts = corpus()
    groups = {group_of(t, "category") for t in texts}
    assert groups == {"write", "explain", "summarize", "translate", "open_qa", "brainstorming"}
    # "Please write a poem" joins "Write thing number k": request words are skipped.
    result = balance(texts, BalanceConfig(by="category", max_per_group=4), seed=3)
    assert result.group_sizes["write"] == 13
    assert result.kept_sizes == {
        "brainstorming": 2, "explain": 4, "open_qa": 4, "summarize": 4, "translate": 4, "write": 4,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("instruction", "verb"),
    [
        ("Write a poem about the sea.", "write"),
        ("Please explain why the sky is blue", "explain"),
        ("Can you please summarize this article?", "summarize"),
        ("I want you to act as a travel guide.", "act"),
        ("1. List five fruits", "list"),
        ("What is the capital of France?", "what"),
        ("Please", "please"),  # nothing after the request word: the word itself
        ("...", NO_VERB),
        ("", NO_VERB),
        ("请你帮我写一首关于秋天的诗", "写"),
        ("解释为什么天空是蓝色的。", "解释"),
        ("生成一个故事", "生成"),
    ],
)
def test_instruction_verb_heuristic(instruction, verb):
    assert instruction_verb(instruction) == verb


def test_cluster_groups_cap_near_duplicates_and_leave_singletons():
    texts = [text("a", k, f"Write variant {k}") for k in range(6)] + [text("b", 0, "Explain x")]
    clusters = {"a:0": 0, "a:1": 0, "a:2": 0, SampleRef("a", 3): 0, "a:4": 1, "a:5": 1}
    assert group_of(texts[6], "cluster", clusters=clusters) == "b:0"
    assert group_of(texts[3], "cluster", clusters=clusters) == "0"
    result = balance(texts, BalanceConfig(by="cluster", max_per_group=1), seed=5)
    # without clusters every record is a group of one
    assert result.removals == []
    result = balance(texts, BalanceConfig(by="cluster", max_per_group=1), seed=5, clusters=clusters)
    survivors = kept(result, texts)
    assert len(survivors) == 3 and SampleRef("b", 0) in survivors
    assert sum(ref.index < 4 and ref.source == "a" for ref in survivors) == 1


def test_source_of_renames_groups():
    texts = corpus()
    result = balance(
        texts,
        BalanceConfig(by="source", max_per_group=45),
        seed=0,
        source_of=lambda ref: "all" if ref.source != "chat" else "chat",
    )
    assert result.group_sizes == {"all": 47, "chat": 3}
    assert len(result.removals) == 2
