"""`ift eval generate` and `ift eval ifeval` through the real command line on the real SmolLM2-135M-Instruct: the
files a user gets, a rerun that generates nothing again, settings that may not be mixed, and IFEval scored from the
answers alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ift_dist.eval.answers_file import read_answers

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def ift_eval(*arguments: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("ift")), "eval", *arguments]
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=environment)


def test_generate_writes_answers_page_and_settings_and_resumes(smollm2_dir, tmp_path):
    out = tmp_path / "vicuna"
    common = ["--prompts", "vicuna_bench", "--max-new-tokens", "6", "--batch-size", "2", "--out", str(out)]
    first = ift_eval("generate", str(smollm2_dir), *common, "--limit", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 answers" in first.stdout
    answers = read_answers(out / "answers.jsonl")
    assert [a["id"] for a in answers] == ["1", "2"]
    assert all(a["finish_reasons"] == ["length"] and a["completion_tokens"] == [6] for a in answers)
    meta = json.loads((out / "generation.json").read_text())
    assert (
        meta["set"] == "vicuna_bench" and "{%" in meta["chat_template"] and meta["model"] == str(smollm2_dir)
    )
    page = (out / "answers.html").read_text()
    assert answers[0]["turns"][0].split()[0] in page

    # a rerun with a larger limit answers only the new prompt and keeps the first two as they were
    second = ift_eval("generate", str(smollm2_dir), *common, "--limit", "3")
    assert second.returncode == 0, second.stderr[-3000:]
    again = read_answers(out / "answers.jsonl")
    assert [a["id"] for a in again] == ["1", "2", "3"]
    assert again[:2] == answers

    # other sampling settings into the same directory: refused, nothing appended
    mixed = ift_eval("generate", str(smollm2_dir), *common, "--limit", "3", "--temperature", "0.7")
    assert mixed.returncode == 1
    assert "generation.json" in mixed.stderr and "temperature" in mixed.stderr
    assert read_answers(out / "answers.jsonl") == again


def test_ifeval_generates_then_scores_and_scores_answers_alone(smollm2_dir, tmp_path):
    out = tmp_path / "ifeval"
    run = ift_eval("ifeval", str(smollm2_dir), "--limit", "3", "--max-new-tokens", "8", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "ifeval_results.json").read_text())
    assert results["num_scored"] == 3
    scores = [json.loads(line) for line in (out / "ifeval_scores.jsonl").read_text().splitlines()]
    assert len(scores) == 3
    assert "| prompt-level |" in run.stdout

    # the same answers scored without a model: the same results
    rescored = tmp_path / "rescored"
    again = ift_eval("ifeval", "--answers", str(out), "--limit", "3", "--out", str(rescored))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((rescored / "ifeval_results.json").read_text()) == results

    # without --limit every IFEval prompt needs an answer: named, exit 1
    missing = ift_eval("ifeval", "--answers", str(out), "--out", str(tmp_path / "all"))
    assert missing.returncode == 1 and "have no answer" in missing.stderr
