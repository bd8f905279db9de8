"""AlpaGasus-style model scores against a scripted OpenAI chat-completions server on loopback: the prompt sent,
scores read back, low scores removed, unparseable and failed replies kept and counted, retries on 429, and a rerun
answered from the cache."""

from __future__ import annotations

import dataclasses
import json

import pytest
from scripted_openai import Reply, ScriptedOpenAI
from shared_paths import DATA

from ift_dist.config.data_schema import SourceConfig
from ift_dist.config.quality_schema import ModelScoreConfig
from ift_dist.data.contracts import SampleRef
from ift_dist.data.quality.score import USER_PROMPT, judge_endpoint, parse_score, score_texts
from ift_dist.data.quality.texts import QualityText, Removal
from ift_dist.data.records import detect_format, to_conversation

# The judge's reply by a marker in the graded response; anything else gets "4".
REPLIES = {
    "GOOD": "5\nAccurate and complete.",
    "EXACT": "4.5\nAccurate, a little terse.",
    "LABELLED": "The response misses half of the question.\nScore: 2",
    "CHATTY": "I would not like to rate this one.",
    "HIGH": "8\nOn my own scale.",
}


class ScriptedJudge(ScriptedOpenAI):
    """Scores chosen by a marker in the graded text (REPLIES), faults injected per marker."""

    def __init__(self) -> None:
        self.faults: dict[str, list[str]] = {}
        super().__init__()

    def respond(self, body: dict, number: int) -> Reply:
        graded = body["messages"][0]["content"]
        action = next((self.faults[m].pop(0) for m in self.faults if m in graded and self.faults[m]), None)
        if action:
            return Reply(status=int(action))
        return Reply(next((reply for marker, reply in REPLIES.items() if marker in graded), "4\nFine."))


@pytest.fixture
def judge_server():
    server = ScriptedJudge()
    yield server
    server.close()


def text(index: int, prompt: str, answer: str) -> QualityText:
    return QualityText(
        SampleRef("t", index), prompt, answer, f"user: {prompt}\n\nassistant: {answer}", prompt
    )


def run(server: ScriptedJudge, texts, cache, **cfg_fields):
    cfg_fields = {"key_env": "IFT_TEST_NO_SUCH_KEY", **cfg_fields}
    cfg = ModelScoreConfig(url=server.url, model="scripted", **cfg_fields)
    endpoint = dataclasses.replace(judge_endpoint(cfg), backoff_s=0.001, timeout_s=5.0, max_retries=3)
    return score_texts(texts, cfg, cache, endpoint=endpoint)


def test_parse_score():
    assert parse_score("4.5\nBecause ...") == 4.5
    assert parse_score("\n  **3** out of 5\nok") == 3.0  # the first non-empty line
    assert parse_score("Fair enough.\nScore: 2.5") == 2.5 and parse_score("Overall score: **4**") == 4.0
    assert parse_score("Rating 0") == 0.0
    assert parse_score("no number here") is None and parse_score("") is None
    assert parse_score("7\nexplanation") is None and parse_score("Score: 6") is None  # off the 0-5 scale


def test_scores_removals_unparseable_retries_and_a_cached_rerun(judge_server, tmp_path):
    record = json.loads((DATA / "llamafactory" / "alpaca_en_demo.json").read_text())[80]
    source = SourceConfig(path="alpaca_en_demo.json", name="alpaca_en_demo")
    conversation = to_conversation(
        record,
        fmt=detect_format(record),
        source=source,
        ref=SampleRef("alpaca_en_demo", 80),
        file="f",
        location="x",
    )
    texts = [
        QualityText.of(conversation),  # a real Alpaca record with an input: no marker, scored 4
        text(1, "Name a fruit.", "GOOD: an apple."),
        text(2, "Name a fruit.", "EXACT: a pear."),
        text(3, "Name two fruits.", "LABELLED: a pear."),
        text(4, "Name a fruit.", "CHATTY"),
        text(5, "Name a fruit.", "HIGH"),
        text(6, "Name a fruit.", "FLAKY GOOD: a plum."),
        text(7, "Name a fruit.", "GOOD: an apple."),  # the same as record 1: asked once
    ]
    judge_server.faults = {"FLAKY": ["429", "429"]}
    cache = tmp_path / "quality" / "score_cache.jsonl"
    result = run(judge_server, texts, cache, max_tokens=64)

    refs = [t.ref for t in texts]
    assert result.scores == {
        refs[0]: 4.0,
        refs[1]: 5.0,
        refs[2]: 4.5,
        refs[3]: 2.0,
        refs[6]: 5.0,
        refs[7]: 5.0,
    }
    assert result.removals == [
        Removal(refs[0], "low_score", None, "score 4 < 4.5"),
        Removal(refs[3], "low_score", None, "score 2 < 4.5"),
    ]
    assert result.unscored == [refs[4], refs[5]]  # kept: neither removed nor scored
    assert dataclasses.asdict(result.counters) == {
        "calls": 7 + 2, "cache_hits": 0, "retries": 2, "failed": 0, "unparseable": 2,
    }  # fmt: skip
    assert len(judge_server.bodies) == 9

    # The AlpaGasus prompt: instruction, input and response in the system message, the 0-5 request from the user.
    first = next(b for b in judge_server.bodies if "London" in b["messages"][0]["content"])
    system, user = first["messages"]
    assert system["content"].startswith(
        "We would like to request your feedback on the performance of AI assistant"
    )
    assert system["content"].endswith(
        "\n\nInstruction: Output the average temperature for a given city in a given month.\n"
        f"Input: City = London\nMonth = March\nResponse: {record['output']}"
    )
    assert user == {"role": "user", "content": USER_PROMPT} and "scale of 0 to 5" in USER_PROMPT
    assert first["temperature"] == 0.0 and first["max_tokens"] == 64 and first["model"] == "scripted"

    # A rerun (a stricter threshold) pays nothing: every reply, unparseable ones included, is cached. (The same
    # max_tokens: the sampling parameters are part of the cache key.)
    again = run(judge_server, texts, cache, threshold=5.0, max_tokens=64)
    assert len(judge_server.bodies) == 9
    assert dataclasses.asdict(again.counters) == {
        "calls": 0, "cache_hits": 7, "retries": 0, "failed": 0, "unparseable": 2,
    }  # fmt: skip
    assert again.scores == result.scores
    assert [r.ref for r in again.removals] == [refs[0], refs[2], refs[3]]


def test_a_failed_call_keeps_the_record_and_is_asked_again(judge_server, tmp_path, monkeypatch):
    monkeypatch.setenv("IFT_TEST_JUDGE_KEY", "secret-key")
    judge_server.faults = {"DOWN": ["400"], "BUSY": ["429"] * 4}
    texts = [text(0, "Q?", "DOWN GOOD"), text(1, "Q?", "BUSY GOOD"), text(2, "Q?", "LABELLED")]
    cache = tmp_path / "cache.jsonl"
    result = run(judge_server, texts, cache, key_env="IFT_TEST_JUDGE_KEY", concurrency=1)
    assert result.unscored == [texts[0].ref, texts[1].ref] and result.scores == {texts[2].ref: 2.0}
    assert [r.ref for r in result.removals] == [texts[2].ref]
    # 400: no retry; 429: 1 + 3 retries, then given up.
    assert dataclasses.asdict(result.counters) == {
        "calls": 1 + 4 + 1, "cache_hits": 0, "retries": 3, "failed": 2, "unparseable": 0,
    }  # fmt: skip
    assert {h["authorization"] for h in judge_server.headers} == {"Bearer secret-key"}

    rerun = run(judge_server, texts, cache, key_env="IFT_TEST_JUDGE_KEY")
    assert rerun.counters.calls == 2 and rerun.counters.cache_hits == 1 and rerun.unscored == []
    assert rerun.scores == {texts[0].ref: 5.0, texts[1].ref: 5.0, texts[2].ref: 2.0}


def test_nothing_is_asked_when_off_or_empty(judge_server, tmp_path):
    off = score_texts([text(0, "Q?", "GOOD")], ModelScoreConfig(), tmp_path / "cache.jsonl")
    assert off.scores == {} and off.removals == [] and off.counters.calls == 0
    empty = run(judge_server, [], tmp_path / "cache.jsonl")
    assert empty.scores == {} and judge_server.bodies == [] and not (tmp_path / "cache.jsonl").exists()
