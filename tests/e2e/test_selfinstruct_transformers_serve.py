"""`ift data generate` end to end against a real OpenAI-compatible server: `transformers serve` on loopback, offline,
with SmolLM2-135M-Instruct on the CPU as the generator. A 135M model rarely writes a valid task list, so what is
asserted is the pipeline: every request logged once with a status, every kept record valid for `ift data validate`,
a killed run resumed without duplicates."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shared_paths import DATA

from ift_dist.config.data_schema import SourceConfig
from ift_dist.data.generate_cli import add_generate_arguments, run_generate
from ift_dist.data.selfinstruct import GeneratePaths
from ift_dist.data.selfinstruct_prompts import ReplyStatus
from ift_dist.data.sources import open_source

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SEEDS = DATA / "stanford_alpaca" / "seed_tasks.jsonl"


def command_args(url: str, model: str, out: Path, *extra: str) -> list[str]:
    return ["--seeds", str(SEEDS), "--out", str(out), "--url", url, "--model", model,
            "--key-env", "IFT_E2E_NO_SUCH_KEY", "--num-prompt-tasks", "1", "--temperature", "0",
            "--max-tokens", "128", "--concurrency", "1", "--timeout", "120", "--max-retries", "1", *extra]  # fmt: skip


def generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    return run_generate(parser.parse_args(argv))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def check_outputs(out: Path, logged_requests: int) -> tuple[dict, list[dict]]:
    """Every request logged once, in order, with a known status; the summary agrees; kept records are valid."""
    paths = GeneratePaths.of(out)
    log, summary, records = read_jsonl(paths.requests), json.loads(paths.summary.read_text()), read_jsonl(out)
    print(f"{out.name}: replies {summary['replies']}, rejected {summary['rejected']}, {len(records)} records")
    assert [e["request"] for e in log] == list(range(logged_requests))
    assert {e["status"] for e in log} <= set(ReplyStatus.values())
    assert all(len(e["prompt_hash"]) == 16 and e["tokens_in"] >= 0 for e in log)
    assert summary["requests"] == len(log) and summary["accepted"] == len(records) == summary["records"]
    calls = summary["this_run"]["calls"]
    assert calls["completed"] + calls["cache_hits"] + calls["failed"] == summary["this_run"]["requests"]
    assert len({r["instruction"] for r in records}) == len(records)  # no duplicates
    for entry in log:  # a bad reply wrote nothing
        assert entry["status"] == "ok" or entry["accepted"] == 0
    if records:
        scan = open_source(SourceConfig(path=str(out))).scan()
        assert scan.bad == [] and len(scan.valid_indices) == len(records)
    return summary, records


def test_numbered_mode_counts_every_reply(served_smollm2, tmp_path):
    url, model = served_smollm2
    out = tmp_path / "numbered.jsonl"
    code = generate(command_args(url, model, out, "--num-tasks", "3", "--num-instructions", "2",
                                 "--max-requests", "2", "--max-bad-replies", "5"))  # fmt: skip
    log = read_jsonl(GeneratePaths.of(out).requests)
    summary, records = check_outputs(out, logged_requests=len(log))
    assert len(log) == 2 or len(records) == 2  # stopped by --max-requests or done
    assert code == (0 if len(records) == 2 else 1)
    assert sum(summary["replies"].values()) == summary["requests"]


def test_topic_mode_resumes_after_a_kill(served_smollm2, tmp_path):
    url, model = served_smollm2
    topics = tmp_path / "topics.txt"
    topics.write_text("the solar system\nbaking bread\nwater\n")
    out = tmp_path / "topics.jsonl"
    argv = command_args(url, model, out, "--topics", str(topics), "--per-topic", "1", "--num-instructions", "3",
                        "--max-bad-replies", "6")  # fmt: skip
    script = (
        "import argparse, sys\nfrom ift_dist.data.generate_cli import add_generate_arguments, run_generate\n"
    )
    script += (
        "p = argparse.ArgumentParser(); add_generate_arguments(p); sys.exit(run_generate(p.parse_args()))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", script, *argv, "--max-requests", "6"], env=env)
    requests_path = GeneratePaths.of(out).requests
    deadline = time.monotonic() + 240
    try:
        while len(read_jsonl(requests_path)) < 1 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    killed_log = read_jsonl(requests_path)
    assert killed_log, "no request logged before the kill"
    records_before = read_jsonl(out)

    code = generate([*argv, "--max-requests", "3"])
    log = read_jsonl(requests_path)
    _, records = check_outputs(out, logged_requests=len(log))
    assert len(log) <= len(killed_log) + 3 and log[: len(killed_log)] == killed_log
    assert records[: len(records_before)] == records_before
    assert code == (0 if len(records) >= 3 else 1) and len(records) <= 3
    assert all(e["topic"] in ("the solar system", "baking bread", "water") for e in log)
