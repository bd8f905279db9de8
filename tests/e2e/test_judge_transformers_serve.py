"""`ift eval judge` end to end against a real OpenAI-compatible server: `transformers serve` on loopback, offline,
with SmolLM2-135M-Instruct on the CPU as the judge (a poor judge: its replies are often unparseable, which must be
counted, never dropped)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ift_dist.eval.judge import add_judge_arguments, run_judge

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def write_answers(path: Path, rows: list[dict]) -> Path:
    with path.open("w") as file:
        for row in rows:
            full = {
                "set": "e2e",
                "system": None,
                "reference": None,
                "sample": 0,
                "category": "writing",
                **row,
            }
            file.write(json.dumps(full) + "\n")
    return path


def judge(url: str, model: str, out: Path, *extra: str) -> tuple[int, dict, list[dict]]:
    parser = argparse.ArgumentParser()
    add_judge_arguments(parser)
    args = parser.parse_args(
        ["--judge-url", url, "--judge-model", model, "--judge-key-env", "IFT_E2E_NO_SUCH_KEY", "--max-tokens", "64",
         "--concurrency", "2", "--timeout", "120", "--out", str(out), *extra]
    )  # fmt: skip
    code = run_judge(args)
    results = json.loads((out / "judge_results.json").read_text())
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    return code, results, judgments


def test_single_and_pairwise_through_transformers_serve(served_smollm2, tmp_path):
    url, model = served_smollm2
    answers = write_answers(tmp_path / "answers.jsonl", [
        {"id": "1", "turns": ["What is the capital of France?"], "answers": ["Paris is the capital of France."]},
        {"id": "2", "category": "math", "turns": ["What is 12 * 3?"], "answers": ["12 * 3 = 36."],
         "reference": ["36"]},
        {"id": "3", "turns": ["Name a primary colour.", "Name another one."], "answers": ["Red.", "Blue."]},
    ])  # fmt: skip
    out = tmp_path / "single"
    code, results, judgments = judge(url, model, out, "--answers", str(answers), "--labels", "sft")
    assert code == 0, results["counters"]
    assert results["counters"]["completed"] == 4 and results["counters"]["failed"] == 0
    assert sorted((j["id"], j["turn"]) for j in judgments) == [("1", 1), ("2", 1), ("3", 1), ("3", 2)]
    assert {j["template"] for j in judgments} == {"single-v1", "single-math-v1", "single-v1-multi-turn"}
    for j in judgments:  # every judgment is a rating or counted as unparseable, with the judge's own words
        assert (j["status"], j["rating"] is None) in {("ok", False), ("unparseable", True)}, j
        assert j["judge_texts"][0] and j["judge_texts"][0].strip()
    overall = results["scores"]["sft"]["overall"]
    assert overall["scored"] + overall["unparseable"] == 4 and overall["call_failed"] == 0
    assert (out / "judge_chart.png").stat().st_size > 0

    # Again: all from the cache, no request reaches the server.
    code, again, _ = judge(url, model, out, "--answers", str(answers), "--labels", "sft")
    assert code == 0 and again["counters"]["requests"] == 0 and again["counters"]["cache_hits"] == 4

    baseline = write_answers(tmp_path / "baseline.jsonl", [
        {"id": "1", "turns": ["What is the capital of France?"], "answers": ["I think it is Lyon."]},
        {"id": "2", "category": "math", "turns": ["What is 12 * 3?"], "answers": ["It is 38."], "reference": ["36"]},
    ])  # fmt: skip
    model_answers = write_answers(tmp_path / "model.jsonl", [
        {"id": "1", "turns": ["What is the capital of France?"], "answers": ["Paris is the capital of France."]},
        {"id": "2", "category": "math", "turns": ["What is 12 * 3?"], "answers": ["12 * 3 = 36."], "reference": ["36"]},
    ])  # fmt: skip
    out = tmp_path / "pairwise"
    extra = ("--mode", "pairwise", "--answers", str(model_answers), "--baseline", str(baseline))
    code, results, judgments = judge(url, model, out, *extra)
    assert code == 0, results["counters"]
    assert results["counters"]["completed"] == 4  # 2 comparisons, each asked in both orders
    cache = [json.loads(line) for line in (out / "judge_cache.jsonl").read_text().splitlines()]
    assert len({entry["key"] for entry in cache}) == 4
    assert len(judgments) == 2
    for j in judgments:
        assert [(o["a"], o["b"]) for o in j["orders"]] == [("model", "baseline"), ("baseline", "model")]
        assert all(o["judge_texts"][0] is not None for o in j["orders"])
        assert j["status"] in ("ok", "unparseable") and (j["outcome"] is None) == (j["status"] != "ok")
    overall = results["scores"]["model"]["overall"]
    assert overall["scored"] + overall["unparseable"] == 2
    code, again, _ = judge(url, model, out, *extra)
    assert code == 0 and again["counters"]["requests"] == 0 and again["counters"]["cache_hits"] == 4
