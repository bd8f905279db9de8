"""Decontamination: benchmark questions and held-out prompts planted (re-wrapped, inside longer instructions) into
real training data are all found with their item ids; the clean shared training sets are checked as they are."""

from __future__ import annotations

import json

import pytest
from shared_paths import DATA

from ift_dist.config.data_schema import SourceConfig
from ift_dist.config.quality_schema import DecontamConfig
from ift_dist.data.contracts import SampleRef
from ift_dist.data.loader import scan_sources
from ift_dist.data.quality.decontam import Decontaminator, EvalItemError, load_eval_items
from ift_dist.data.quality.texts import QualityText, normalise

EVAL = DATA / "eval"
PLANTED = [
    "mmlu/test/anatomy:12",
    "mmlu/test/high_school_geography:40",
    "mmlu/val/marketing:3",
    "cmmlu/test/agronomy:3",
    "mt_bench:81:turn1",
    "mt_bench:81:turn2",  # 11 words: a short item, matched as one whole gram
    "mt_bench:130:turn1",
    "ifeval:1000",
    "ifeval:1005",
    "ifeval:1012",
]


def _texts(path: str, name: str, **extra) -> list[QualityText]:
    (item,) = scan_sources([SourceConfig(path=str(DATA / path), name=name, **extra)])
    return [QualityText.of(item.source.get(i)) for i in item.scan.valid_indices.tolist()]


def _user(index: int, prompt: str) -> QualityText:
    return QualityText(SampleRef("planted", index), prompt, "ok", f"user: {prompt}\n\nassistant: ok", prompt)


@pytest.fixture(scope="module")
def items():
    return load_eval_items([str(EVAL)])


@pytest.fixture(scope="module")
def ngram(items):
    return Decontaminator(items, DecontamConfig())


def _rewrapped(text: str, host: str) -> str:
    """The item inside a longer instruction, its whitespace changed (spaces doubled, lines re-broken)."""
    wrapped = " \n ".join("  ".join(line.split(" ")) for line in text.splitlines())
    return f"{host}\n\nAlso, answer the following:\n\n{wrapped}\n\nPlease be brief."


def test_planted_items_are_found_with_their_ids(items, ngram):
    by_id = {item.id: item for item in items}
    training = _texts("llamafactory/alpaca_en_demo.json", "alpaca_en")[:300]
    planted = [_user(n, _rewrapped(by_id[i].text, training[n].prompt)) for n, i in enumerate(PLANTED)]
    found = {str(r.ref): r for r in map(ngram.match, training + planted) if r is not None}
    assert set(found) == {f"planted:{n}" for n in range(len(PLANTED))}
    for n, item_id in enumerate(PLANTED):
        removal = found[f"planted:{n}"]
        assert removal.reason == "contaminated" and "-gram: " in removal.detail
        # an item whose text recurs in another set (MT-bench 81 is also AlpacaEval 801) may be named by that one
        same_text = normalise(by_id[removal.matched].text) == normalise(by_id[item_id].text)
        assert removal.matched == item_id or same_text, (item_id, removal)
    assert found["planted:0"].matched == "mmlu/test/anatomy:12"
    assert (
        found["planted:4"].matched == "alpaca_eval:801"
    )  # MT-bench 81's first turn is Vicuna 77 and AlpacaEval 801
    assert found["planted:4"].detail.endswith("(also mt_bench:81:turn1, vicuna_bench:77)")
    assert found["planted:5"].detail.startswith("11-gram: rewrite your previous response")


def test_minhash_finds_whole_copies(items):
    subset = [
        item for item in items if item.id.startswith(("ifeval:", "mt_bench:"))
    ]  # indexing all takes ~10 s
    checker = Decontaminator(subset, DecontamConfig(method="minhash", threshold=0.8))
    by_id = {item.id: item for item in items}
    copy = _user(0, "  ".join(by_id["ifeval:1005"].text.split(" ")))
    removal = checker.match(copy)
    assert removal is not None and removal.matched == "ifeval:1005" and removal.detail.startswith("jaccard~")
    host = _texts("llamafactory/alpaca_en_demo.json", "alpaca_en")[7]
    assert checker.match(host) is None


def test_demo_training_sets_are_clean(ngram):
    """The demo's sources (configs/demo_cpu.yaml: identity, alpaca_en_demo) and the other shared training sets
    share no 13-gram (CJK: 13 characters) and no short whole item with MMLU, C-Eval, CMMLU or the prompt sets."""
    sets = [
        (
            "llamafactory/identity.json",
            "identity",
            {"placeholders": {"name": "Nimbus", "author": "the ift-dist team"}},
        ),
        ("llamafactory/alpaca_en_demo.json", "alpaca_en", {}),
        ("llamafactory/alpaca_zh_demo.json", "alpaca_zh", {}),
        ("fastchat/dummy_conversation.json", "fastchat", {}),
        ("stanford_alpaca/seed_tasks.jsonl", "seed_tasks", {}),
    ]
    for path, name, extra in sets:
        found = [r for r in map(ngram.match, _texts(path, name, **extra)) if r is not None]
        assert found == [], (name, found[:5])


def test_item_sources(tmp_path):
    mmlu = load_eval_items([str(EVAL / "mmlu")])
    assert len(mmlu) == 14042 + 1531 + 285 and mmlu[0].id == "mmlu/test/abstract_algebra:0"
    assert mmlu[0].text.splitlines()[1].startswith("A. ")
    ifeval = load_eval_items([str(EVAL / "ifeval/input_data.jsonl")])
    assert len(ifeval) == 541 and ifeval[0].id == "ifeval:1000"
    own = tmp_path / "mine.jsonl"
    own.write_text(
        json.dumps({"q": "What is the capital city of Australia today?", "a": "Canberra", "n": 3}) + "\n"
    )
    assert [(i.id, i.text) for i in load_eval_items([str(own)])] == [
        ("mine:1:q", "What is the capital city of Australia today?")
    ]
    table = tmp_path / "mine.csv"
    table.write_text("id,question\n1,Name three primary colours of light please\n")
    assert [i.id for i in load_eval_items([str(table)])] == ["mine:2:1"]
    own.write_text('{"q": "fine enough text to be an item"}\n{"q": broken\n')
    with pytest.raises(EvalItemError, match=r"mine.jsonl:2: not JSON"):
        load_eval_items([str(own)])
    with pytest.raises(EvalItemError, match="no such file"):
        load_eval_items([str(tmp_path / "absent")])
