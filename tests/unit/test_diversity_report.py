"""The diversity report: distinct-n and nearest-neighbour ROUGE-L on hand-counted examples (CJK included), the
pruned nearest-neighbour search against brute force, the words sections with and without a tagger, the HTML page's
sections and images, and `ift data report` end to end on the shared Alpaca sets."""

from __future__ import annotations

import argparse
import base64
import json
import random
import re
import sys

import pytest
from rouge_score import rouge_scorer
from shared_paths import DATA, TOKENIZERS

from ift_dist.data.contracts import SampleRef
from ift_dist.data.diversity import (
    ROUGE_MAX_TOKENS,
    build_report,
    distinct_n,
    nearest_rouge_l,
    text_tokens,
    top_words,
)
from ift_dist.data.diversity_command import add_report_arguments, run_report
from ift_dist.data.diversity_plots import render_html
from ift_dist.data.quality.texts import QualityText, Removal


def quality_text(source: str, index: int, instruction: str, answer: str, category=None) -> QualityText:
    return QualityText(
        SampleRef(source, index),
        instruction,
        answer,
        f"user: {instruction}\n\nassistant: {answer}",
        instruction,
        category,
    )


def test_distinct_n_counts_unique_over_all_ngrams_pooled():
    texts = ["The cat sat.", "the cat ran"]
    # unigrams: the cat sat the cat ran -> 4 unique of 6; bigrams: the-cat cat-sat the-cat cat-ran -> 3 of 4
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["one"], 2) == 0.0  # no bigram at all


def test_cjk_text_is_tokenized_by_character():
    assert text_tokens("写一首诗, about the SEA 2") == ["写", "一", "首", "诗", "about", "the", "sea", "2"]
    # 我 爱 你 我 爱 他: 4 unique characters of 6; bigrams 我爱 爱你 我爱 爱他: 3 of 4
    assert distinct_n(["我爱你", "我爱他"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["我爱你", "我爱他"], 2) == pytest.approx(3 / 4)


def test_nearest_neighbour_rouge_l_by_hand():
    texts = ["Write a poem about the sea", "write a poem about the moon!", "Explain quantum physics"]
    # LCS(first, second) = write a poem about the = 5 of 6 and 6 tokens: F1 = 5/6; the third shares nothing
    assert nearest_rouge_l(texts) == pytest.approx([5 / 6, 5 / 6, 0.0])
    assert nearest_rouge_l(["alone"]) == [0.0]


def test_nearest_neighbour_rouge_l_scores_cjk_by_character():
    texts = ["写一首关于大海的诗", "写一首关于月亮的诗"]
    # 9 characters each, LCS 写一首关于 + 的诗 = 7: F1 = 7/9. rouge-score's own tokenizer keeps no CJK token at all.
    assert nearest_rouge_l(texts) == pytest.approx([7 / 9, 7 / 9])
    assert rouge_scorer.RougeScorer(["rougeL"]).score(*texts)["rougeL"].fmeasure == 0.0


def test_pruned_search_equals_brute_force_on_real_instructions():
    records = json.loads((DATA / "llamafactory" / "alpaca_en_demo.json").read_text())
    records += json.loads((DATA / "llamafactory" / "alpaca_zh_demo.json").read_text())
    texts = [record["instruction"] for record in random.Random(0).sample(records, 60)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokens())
    brute = [
        max(scorer.score(texts[i], texts[j])["rougeL"].fmeasure for j in range(len(texts)) if j != i)
        for i in range(len(texts))
    ]
    assert nearest_rouge_l(texts) == pytest.approx(brute)
    assert max(brute) > 0.3  # the check compares something


class _Tokens:
    def tokenize(self, text):
        return text_tokens(text, ROUGE_MAX_TOKENS)


INSTRUCTIONS = [
    "Write a poem about the sea",
    "Rewrite the following sentence",
    "Explain the given data",
    "请写一首诗",
]


def test_words_without_a_tagger_are_first_and_content_words_only():
    words = top_words(INSTRUCTIONS, None)
    assert set(words) == {"first_words", "content_words"}
    assert dict(words["first_words"]) == {"write": 1, "rewrite": 1, "explain": 1}  # English instructions only
    assert "the" not in dict(words["content_words"]) and dict(words["content_words"])["poem"] == 1


def test_words_with_the_offline_tagger_are_verbs_and_nouns():
    pytest.importorskip("denckring_en_pos")
    from ift_dist.data.diversity import pos_tagger

    tagger, name = pos_tagger()
    words = top_words(INSTRUCTIONS, tagger)
    assert "denckring-en-pos" in name
    assert dict(words["verbs"]) == {
        "write": 1,
        "rewrite": 1,
        "explain": 1,
    }  # "following", "given" are participles
    assert {"poem", "sea", "sentence", "data"} <= set(dict(words["nouns"]))
    assert dict(words["verb_noun"]) == {"write poem": 1, "rewrite sentence": 1, "explain data": 1}


def small_texts() -> list[QualityText]:
    english = [
        quality_text("en", k, f"Write a story about topic {k}", f"Once upon a time {k} ...")
        for k in range(12)
    ]
    chinese = [
        quality_text("zh", k, f"写一个关于{k}的故事", "从前有一座山，山里有一座庙。" * (k + 1))
        for k in range(6)
    ]
    return english + chinese + [quality_text("en", 99, "Name a colour", "Blue", category="open_qa")]


def test_report_sections_and_html_with_embedded_images():
    texts = small_texts()
    removals = [
        Removal(SampleRef("en", 50), "duplicate", "en:3"),
        Removal(SampleRef("zh", 9), "filter:refusal"),
    ]
    report = build_report(texts, sample=10, seed=1, clusters=[["en:0", "en:1", "en:2"]], removals=removals)
    assert report["records"] == 19 and report["sample"] == 10
    assert report["groupings"]["source"]["en"]["records"] == 13
    assert set(report["groupings"]["category"]) == {"write", "写", "open_qa"}
    assert report["removed"]["by_reason"] == {"duplicate": 1, "filter:refusal": 1}
    assert report["clusters"]["largest"][0] == {
        "size": 3, "refs": ["en:0", "en:1", "en:2"], "instruction": "Write a story about topic 0",
    }  # fmt: skip
    assert set(report["languages"]["overall"]) >= {"en", "zh-cn"}
    page = render_html(report)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # by source, by category, lengths, ROUGE-L, 2 word charts (+3 with the tagger), languages, removals
    assert len(images) == 8 + (3 if report["tools"]["pos_tagger"] else 0)
    assert all(base64.b64decode(image).startswith(b"\x89PNG\r\n\x1a\n") for image in images)
    for section in (
        "summary",
        "by-source",
        "by-category",
        "lengths",
        "rouge",
        "words",
        "languages",
        "clusters",
    ):
        assert f'id="{section}"' in page
    assert (
        "<script" not in page and "<td>写</td>" in page
    )  # a CJK group is named in the table (charts: "#rank")


def test_the_sample_is_the_same_whatever_the_order():
    texts = small_texts()
    shuffled = texts[:]
    random.Random(3).shuffle(shuffled)
    first, second = build_report(texts, sample=7, seed=2), build_report(shuffled, sample=7, seed=2)
    assert (
        first["rouge_l"] == second["rouge_l"]
        and first["languages"]["overall"] == second["languages"]["overall"]
    )


def test_run_report_end_to_end(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""seed: 3
data:
  tokenizer: {TOKENIZERS / "smollm2-135m-instruct"}
  sources:
    - path: {DATA / "llamafactory" / "identity.json"}
      name: identity
      placeholders: {{name: Nimbus, author: us}}
    - path: {DATA / "llamafactory" / "alpaca_zh_demo.json"}
      name: alpaca_zh
    - path: {DATA / "stanford_alpaca" / "seed_tasks.jsonl"}
      name: seed_tasks
  quality:
    dedup: {{exact: true}}
"""
    )
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    add_report_arguments(parser)
    html_dir = tmp_path / "out"
    html_dir.mkdir()
    args = parser.parse_args(
        [str(config), "data.quality.dedup.lowercase=true", "--html", str(html_dir), "--json", str(tmp_path / "r.json"),
         "--sample", "80"]
    )  # fmt: skip
    assert run_report(args) == 0
    page = (html_dir / "report.html").read_text()
    report = json.loads((tmp_path / "r.json").read_text())
    sources = report["groupings"]["source"]
    assert set(sources) == {"identity", "alpaca_zh", "seed_tasks"}
    removed = report["removed"]["by_source"]
    assert sources["identity"]["records"] + sum(removed.get("identity", {}).values()) == 91
    assert sources["alpaca_zh"]["records"] + sum(removed.get("alpaca_zh", {}).values()) == 1000
    assert report["removed"]["by_reason"].get("duplicate", 0) > 0  # alpaca_zh_demo repeats some records
    assert report["sample"] == 80 and report["tools"]["rouge_score"] == "0.1.2"
    assert "prompt_tokens" in report["lengths"] and sources["alpaca_zh"]["distinct_2"] > 0
    assert "zh-cn" in report["languages"]["by_source"]["alpaca_zh"]
    assert page.count("data:image/png;base64,") >= 7 and 'id="removed"' in page


def test_without_the_tagger_the_report_says_so_and_lists_no_verbs(monkeypatch):
    monkeypatch.setitem(sys.modules, "denckring_en_pos", None)  # as if not installed: the import fails
    report = build_report(small_texts(), sample=5, seed=0)
    assert report["tools"]["pos_tagger"] is None
    assert "verbs" not in report["words"] and dict(report["words"]["first_words"])["write"] == 12
    assert "none installed: first words and content words instead" in render_html(report)
