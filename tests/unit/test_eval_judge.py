"""`ift eval judge` against a scripted OpenAI chat-completions server on loopback: prompts, verdict parsing, retries,
the cache (resume after a kill), the pairwise swap, the bootstrap interval and the written results."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from scripted_openai import Reply, ScriptedOpenAI

from ift_dist.eval.judge import add_judge_arguments, bootstrap_ci, run_judge
from ift_dist.eval.judge_prompts import (
    AnswerRecord,
    majority,
    pairwise_prompt,
    parse_rating,
    parse_verdict,
    single_prompt,
    swap_outcome,
)

REPO = Path(__file__).resolve().parents[2]
A_START, A_END = "[The Start of Assistant A's Answer]\n", "\n[The End of Assistant A's Answer]"
B_START, B_END = "[The Start of Assistant B's Answer]\n", "\n[The End of Assistant B's Answer]"


def scripted_reply(content: str, seen_before: int) -> str:
    """The judge's reply, chosen by markers the test answers carry."""
    if A_START in content:  # pairwise, turn 1
        answer_a = content.split(A_START)[1].split(A_END)[0]
        answer_b = content.split(B_START)[1].split(B_END)[0]
        if "NO_VERDICT" in content:
            return "Both answers have merits; I cannot decide."
        if "POSITION_BIAS" in content:
            return "The first answer is better. [[A]]"
        if ("GOOD" in answer_a) != ("GOOD" in answer_b):
            return "Explanation. My verdict: [[A]]" if "GOOD" in answer_a else "Explanation. [[B]]"
        return "They are equal. [[C]]"
    if "NO_RATING" in content:
        return "The answer is fine, I suppose."
    if "VARY" in content:  # one rating per repeat
        return f"Rating: [[{(2, 8, 7)[seen_before % 3]}]]"
    if "GOOD" in content:
        return 'Format "Rating: [[5]]" asked. Good answer. Rating: [[9]]'
    if "BAD" in content:
        return "Wrong. Rating: [[3]]"
    return "Rating: [[5]]"


class ScriptedJudge(ScriptedOpenAI):
    """Replies chosen by content (scripted_reply), faults injected per marker found in the last user message."""

    def __init__(self) -> None:
        self.requests: list[str] = []  # the last user message of every request, in arrival order
        self.faults: dict[str, list[str]] = {}  # marker -> actions for the next requests carrying it
        super().__init__()

    def respond(self, body: dict, number: int) -> Reply:
        content = body["messages"][-1]["content"]
        seen_before = self.requests.count(content)
        self.requests.append(content)
        action = next((self.faults[m].pop(0) for m in self.faults if m in content and self.faults[m]), None)
        if action in ("429", "500", "400"):
            return Reply(status=int(action))
        return Reply(scripted_reply(content, seen_before), delay_s=2.5 if action == "slow" else 0.0)


@pytest.fixture
def judge_server():
    server = ScriptedJudge()
    yield server
    server.close()


def write_answers(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as file:
        for row in rows:
            row = {
                "set": "test",
                "system": None,
                "reference": None,
                "sample": 0,
                "category": "writing",
                **row,
            }
            file.write(json.dumps(row) + "\n")
    return path


def judge_args(server: ScriptedJudge, out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_judge_arguments(parser)
    return parser.parse_args(
        ["--judge-url", server.url, "--judge-model", "scripted", "--judge-key-env", "IFT_TEST_NO_SUCH_KEY",
         "--backoff", "0.001", "--timeout", "1.0", "--max-retries", "3", "--out", str(out), *extra]
    )  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the protocol: prompts and verdicts -----------------------------------------------------------------------
def test_prompts_pick_the_template_by_turn_and_reference():
    record = AnswerRecord("1", "math", ("What is 2+2?", "And 3+3?"), ("4", "6"), ("REF-4", "REF-6"), 0)
    first = single_prompt(record, 1, ("math",))
    assert first.template == "single-math-v1"
    assert first.messages[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert (
        "[Question]\nWhat is 2+2?" in first.messages[1]["content"] and "REF-4" in first.messages[1]["content"]
    )
    second = single_prompt(record, 2, ("math",))
    assert second.template == "single-math-v1-multi-turn" and "REF-6" in second.messages[1]["content"]
    assert "### User:\nAnd 3+3?\n\n### Assistant A:\n6" in second.messages[1]["content"]
    assert single_prompt(record, 1, ()).template == "single-v1"  # not a reference category
    other = AnswerRecord("1", "math", record.turns, ("5", "7"), None, 0)
    pair = pairwise_prompt(record, other, 1, ("math",))
    assert pair.template == "pair-math-v1"
    assert (
        f"{A_START}4{A_END}" in pair.messages[1]["content"]
        and f"{B_START}5{B_END}" in pair.messages[1]["content"]
    )
    assert pairwise_prompt(other, record, 2, ()).template == "pair-v2-multi-turn"
    with pytest.raises(ValueError, match="different questions"):
        pairwise_prompt(record, AnswerRecord("1", "math", ("?", "??"), ("5", "7"), None, 0), 1, ())


def test_verdict_parsing():
    assert parse_rating('Format: "Rating: [[5]]". Mine: Rating: [[8]]') == 8.0  # the last one wins
    assert parse_rating("Rating: [[ 7.5 ]]") == 7.5
    assert parse_rating("Rating: [6]") == 6.0 and parse_rating("Rating: 4") == 4.0
    assert parse_rating("Rating: [[11]]") is None and parse_rating("Rating: [[rating]]") is None
    assert parse_rating("no number at all") is None
    assert parse_verdict('"[[A]]" if A is better ... so: [[B]]') == "B"
    assert parse_verdict("A is better") is None
    assert majority(["A", "A", "B"]) == "A" and majority(["A", "B"]) == "C" and majority([]) is None
    assert swap_outcome("A", "B") == ("win", True) and swap_outcome("B", "A") == ("loss", True)
    assert swap_outcome("A", "A") == ("tie", False) and swap_outcome("C", "C") == ("tie", True)


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    values = [1.0] * 30 + [0.5] * 10 + [0.0] * 20
    low, high = bootstrap_ci(values, 1000, 0.95, seed=7)
    mean = sum(values) / len(values)
    assert low < mean < high and 0.05 < high - low < 0.4
    assert bootstrap_ci(values, 1000, 0.95, seed=7) == (low, high)
    assert bootstrap_ci(values, 1000, 0.95, seed=8) != (low, high)
    assert (
        bootstrap_ci(values, 1000, 0.5, seed=7)[1] - bootstrap_ci(values, 1000, 0.5, seed=7)[0] < high - low
    )
    assert bootstrap_ci([1.0] * 5, 100, 0.95, seed=0) == (1.0, 1.0)
    assert bootstrap_ci([], 100, 0.95, seed=0) is None


# --- single grading over HTTP ----------------------------------------------------------------------------------
def test_single_mode_counts_retries_unparseable_and_cache_hits(judge_server, tmp_path, capsys):
    before = write_answers(tmp_path / "before" / "answers.jsonl", [
        {"id": "1", "turns": ["q1", "q1 again"], "answers": ["GOOD one", "GOOD two"]},
        {"id": "2", "category": "math", "turns": ["2+2?"], "answers": ["BAD 5"], "reference": ["4"]},
        {"id": "3", "turns": ["q3"], "answers": ["NO_RATING here"]},
        {"id": "4", "turns": ["q4"], "answers": ["FLAKY plain"]},
    ])  # fmt: skip
    after = write_answers(tmp_path / "after" / "answers.jsonl", [
        {"id": "1", "turns": ["q1"], "answers": ["SLOW GOOD"]},
    ])  # fmt: skip
    judge_server.faults = {"FLAKY": ["429", "429", "500"], "SLOW": ["slow"]}
    out = tmp_path / "out"
    args = judge_args(judge_server, out, "--answers", str(before), str(after), "--concurrency", "3")
    assert run_judge(args) == 0
    results = json.loads((out / "judge_results.json").read_text())
    calls = 5 + 1  # before: 2 turns + 3, after: 1
    assert results["counters"] == {
        "requests": calls + 4, "completed": calls, "cache_hits": 0, "retries": 4, "rate_limited": 2,
        "server_errors": 1, "timeouts": 1, "connection_errors": 0, "failed": 0,
    }  # fmt: skip
    assert len(judge_server.requests) == calls + 4
    judgments = {(j["label"], j["id"], j["turn"]): j for j in read_jsonl(out / "judgments.jsonl")}
    assert len(judgments) == calls
    assert (
        judgments["before", "1", 1]["rating"] == 9.0
        and judgments["before", "1", 2]["template"] == "single-v1-multi-turn"
    )
    assert (
        judgments["before", "2", 1]["template"] == "single-math-v1"
        and judgments["before", "2", 1]["rating"] == 3.0
    )
    unparseable = judgments["before", "3", 1]
    assert unparseable["status"] == "unparseable" and unparseable["rating"] is None
    assert unparseable["judge_texts"] == ["The answer is fine, I suppose."]
    scores = results["scores"]
    assert scores["before"]["overall"]["score"] == pytest.approx((9 + 9 + 3 + 5) / 4)
    assert scores["before"]["overall"]["unparseable"] == 1 and scores["before"]["overall"]["n"] == 5
    assert scores["before"]["by_category"]["math"]["score"] == 3.0
    assert scores["before"]["by_turn"]["2"]["score"] == 9.0 and scores["after"]["overall"]["score"] == 9.0
    table = capsys.readouterr().out
    assert "| **overall** | 6.50 (n=4, 1 unscored) | 9.00 (n=1) |" in table
    assert (out / "judge_chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same command again: every reply comes from the cache, the server sees nothing.
    assert run_judge(args) == 0
    again = json.loads((out / "judge_results.json").read_text())
    assert again["counters"]["cache_hits"] == calls and again["counters"]["requests"] == 0
    assert len(judge_server.requests) == calls + 4
    assert again["scores"] == scores


def test_repeats_take_the_median_with_a_cache_entry_each(judge_server, tmp_path):
    answers = write_answers(tmp_path / "a.jsonl", [{"id": "1", "turns": ["q"], "answers": ["VARY"]}])
    args = judge_args(judge_server, tmp_path / "out", "--answers", str(answers), "--repeats", "3")
    assert run_judge(args) == 0
    (judgment,) = read_jsonl(tmp_path / "out" / "judgments.jsonl")
    assert sorted(judgment["ratings"]) == [2.0, 7.0, 8.0] and judgment["rating"] == 7.0
    assert len(read_jsonl(tmp_path / "out" / "judge_cache.jsonl")) == 3
    assert run_judge(args) == 0 and len(judge_server.requests) == 3


def test_failed_calls_are_counted_never_cached_and_retried_by_a_rerun(judge_server, tmp_path):
    answers = write_answers(tmp_path / "a.jsonl", [
        {"id": "1", "turns": ["q"], "answers": ["DOWN"]}, {"id": "2", "turns": ["q"], "answers": ["REJECTED"]},
    ])  # fmt: skip
    judge_server.faults = {"DOWN": ["500"] * 4, "REJECTED": ["400"]}
    args = judge_args(judge_server, tmp_path / "out", "--answers", str(answers), "--concurrency", "1")
    assert run_judge(args) == 1
    results = json.loads((tmp_path / "out" / "judge_results.json").read_text())
    assert results["counters"]["requests"] == 4 + 1  # 1 + 3 retries on 500; none on 400
    assert results["counters"]["failed"] == 2 and results["counters"]["server_errors"] == 4
    assert (
        results["scores"]["a"]["overall"]["call_failed"] == 2
        and results["scores"]["a"]["overall"]["score"] is None
    )
    assert not (tmp_path / "out" / "judge_cache.jsonl").read_text()
    assert run_judge(args) == 0 and len(judge_server.requests) == 5 + 2


def test_bad_arguments_exit_2(judge_server, tmp_path):
    answers = write_answers(tmp_path / "a.jsonl", [{"id": "1", "turns": ["q"], "answers": ["x"]}])
    assert run_judge(judge_args(judge_server, tmp_path, "--answers", str(answers), "--mode", "pairwise")) == 2
    assert run_judge(judge_args(judge_server, tmp_path, "--answers", str(answers), "--labels", "a", "b")) == 2
    assert judge_server.requests == []


# --- pairwise over HTTP ----------------------------------------------------------------------------------------
def test_pairwise_asks_both_orders_and_inconsistent_verdicts_are_ties(judge_server, tmp_path, capsys):
    model = write_answers(tmp_path / "model.jsonl", [
        {"id": "win", "turns": ["q1"], "answers": ["GOOD m1"]},
        {"id": "bias", "turns": ["q2"], "answers": ["POSITION_BIAS m2"]},
        {"id": "loss", "turns": ["q3"], "answers": ["plain m3"]},
        {"id": "none", "turns": ["q4"], "answers": ["NO_VERDICT m4"]},
    ])  # fmt: skip
    base = write_answers(tmp_path / "base.jsonl", [
        {"id": i, "turns": [q], "answers": [a]}
        for i, q, a in [("win", "q1", "b1"), ("bias", "q2", "b2"), ("loss", "q3", "GOOD b3"), ("none", "q4", "b4")]
    ])  # fmt: skip
    out = tmp_path / "out"
    args = judge_args(
        judge_server, out, "--mode", "pairwise", "--answers", str(model), "--baseline", str(base)
    )
    assert run_judge(args) == 0
    assert len(judge_server.requests) == 8
    for model_answer, base_answer in [("GOOD m1", "b1"), ("POSITION_BIAS m2", "b2"), ("plain m3", "GOOD b3")]:
        orders = Counter(
            "model first" if f"{A_START}{model_answer}{A_END}" in r else "model second"
            for r in judge_server.requests
            if model_answer in r and base_answer in r
        )
        assert orders == {"model first": 1, "model second": 1}
    judgments = {j["id"]: j for j in read_jsonl(out / "judgments.jsonl")}
    assert (judgments["win"]["outcome"], judgments["win"]["consistent"]) == ("win", True)
    assert (judgments["bias"]["outcome"], judgments["bias"]["consistent"]) == ("tie", False)
    assert [o["verdict"] for o in judgments["bias"]["orders"]] == ["A", "A"]
    assert (judgments["loss"]["outcome"], judgments["loss"]["consistent"]) == ("loss", True)
    assert judgments["none"]["status"] == "unparseable" and judgments["none"]["outcome"] is None
    assert judgments["none"]["unparseable_replies"] == 2
    overall = json.loads((out / "judge_results.json").read_text())["scores"]["model"]["overall"]
    assert overall["score"] == pytest.approx(0.5)  # (1 + 1/2 + 0) / 3
    assert (overall["wins"], overall["ties"], overall["losses"], overall["inconsistent"]) == (1, 1, 1, 1)
    assert overall["unparseable"] == 1 and overall["scored"] == 3
    low, high = overall["ci"]
    assert low <= 0.5 <= high and (low, high) == bootstrap_ci([1.0, 0.5, 0.0], 1000, 0.95, 1234)
    assert "50.0% [" in capsys.readouterr().out


def test_pairwise_needs_a_baseline_answer_for_every_answer(judge_server, tmp_path):
    model = write_answers(tmp_path / "m.jsonl", [{"id": "1", "turns": ["q"], "answers": ["x"]}])
    base = write_answers(tmp_path / "b.jsonl", [{"id": "2", "turns": ["q"], "answers": ["y"]}])
    args = judge_args(
        judge_server, tmp_path / "out", "--mode", "pairwise", "--answers", str(model), "--baseline", str(base)
    )
    assert run_judge(args) == 1 and judge_server.requests == []


# --- a killed run resumes without paying twice -----------------------------------------------------------------
def test_a_killed_run_resumes_without_repeating_a_call(judge_server, tmp_path):
    rows = [{"id": str(i), "turns": [f"question {i}"], "answers": [f"answer {i}"]} for i in range(6)]
    answers = write_answers(tmp_path / "a.jsonl", rows)
    out = tmp_path / "out"
    judge_server.hold_after = 3  # the 4th request hangs until the process is killed
    script = (
        "import sys; from ift_dist.eval.judge import add_judge_arguments, run_judge; import argparse\n"
        "parser = argparse.ArgumentParser(); add_judge_arguments(parser)\n"
        "sys.exit(run_judge(parser.parse_args(sys.argv[1:])))\n"
    )
    argv = ["--judge-url", judge_server.url, "--judge-model", "scripted", "--judge-key-env", "IFT_TEST_NO_SUCH_KEY",
            "--concurrency", "1", "--timeout", "30", "--answers", str(answers), "--out", str(out)]  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", script, *argv], cwd=REPO, start_new_session=True)
    try:
        assert judge_server.held.wait(30), "the judge never sent its 4th request"
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(10)
    assert process.returncode == -signal.SIGKILL
    paid = list(judge_server.requests[:3])
    assert len(read_jsonl(out / "judge_cache.jsonl")) == 3
    with (out / "judge_cache.jsonl").open("a") as file:
        file.write('{"key": "torn by the kill')  # a write the kill cut short
    judge_server.hold_after = None
    judge_server.release.set()

    assert run_judge(judge_args(judge_server, out, "--answers", str(answers))) == 0
    resumed = judge_server.requests[4:]
    assert len(resumed) == 6 - 3 and not set(resumed) & set(paid)
    results = json.loads((out / "judge_results.json").read_text())
    assert results["counters"]["cache_hits"] == 3 and results["counters"]["completed"] == 3
    assert results["scores"]["a"]["overall"]["scored"] == 6
