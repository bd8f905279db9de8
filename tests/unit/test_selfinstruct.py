"""`ift data generate` (Self-Instruct / Alpaca) against a scripted chat-completions server on loopback: reply parsing,
the Alpaca filters, the ROUGE-L pool, retries and bad replies with exact counts, topic mode, and resume after a kill."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rouge_score import rouge_scorer
from scripted_openai import Reply, ScriptedOpenAI

from ift_dist.config.data_schema import SourceConfig
from ift_dist.data.generate_cli import add_generate_arguments, run_generate
from ift_dist.data.quality.filters import Filters
from ift_dist.data.selfinstruct import GeneratePaths, GenerateSettings, RougePool, read_tasks, task_problem
from ift_dist.data.selfinstruct_prompts import (
    ReplyStatus,
    Task,
    numbered_prompt,
    parse_numbered,
    parse_topic_reply,
)
from ift_dist.data.sources import open_source

REPO = Path(__file__).resolve().parents[2]
VOCAB = [f"term{n}" for n in range(400)]
SEEDS = [
    ("Suggest a name for a bakery that sells vegan pastries.", "", "Green Crumb Bakery."),
    ("Convert the temperature from Celsius to Fahrenheit.", "25 C", "77 F"),
    ("Classify the sentiment of the sentence as positive or negative.", "I loved it.", "Positive"),
    ("List three benefits of regular exercise for older adults.", "", "Strength, balance, mood."),
    ("Rewrite the sentence in the passive voice please.", "The cat ate the fish.", "The fish was eaten."),
]


def good_task(rng: random.Random) -> tuple[str, str, str]:
    a, b, c, d, e = rng.sample(VOCAB, 5)
    return f"Explain how {a} relates to {b} and {c} within {d} {e}.", "<noinput>", f"{a} and {b} are linked."


def numbered_reply(prompt: str, short: bool) -> str:
    """Tasks first..last (from the prompt) in a fixed pattern: good, blacklisted, a seed copy, good, a copy of the
    first; further numbers good. Random words seeded by the prompt: the same prompt gets the same reply."""
    first = int(re.findall(r"(\d+)\. Instruction:$", prompt)[0])
    last = int(re.search(r"a set of (\d+)", prompt).group(1))
    shown_seed = re.search(r"^1\. Instruction: (.*)$", prompt, re.M).group(1)
    rng = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
    tasks = []
    for number in range(first, last + 1):
        kind = number - first
        if kind == 1:
            tasks.append(("Draw a picture of a lighthouse at sunset.", "<noinput>", "I cannot draw."))
        elif kind == 2:
            tasks.append((shown_seed, "<noinput>", "Copied."))
        elif kind == 4:
            tasks.append(tasks[0])
        else:
            tasks.append(good_task(rng))
    if short:
        tasks = tasks[:2]
    parts = [f"{first + i}. Instruction: {t[0]}\n{first + i}. Input:\n{t[1]}\n{first + i}. Output:\n{t[2]}\n" for i, t in enumerate(tasks)]  # fmt: skip
    text = "###\n".join(parts)
    return text.split("Instruction: ", 1)[
        1
    ]  # a continuation of the prompt's last line, as chat models often do


def topic_reply(prompt: str) -> str:
    count = int(re.search(r"Write (\d+) diverse", prompt).group(1))
    topic = re.search(r'about the topic "(.*?)"', prompt).group(1)
    rng = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
    items = []
    for _ in range(count):
        instruction, _, output = good_task(rng)
        items.append({"instruction": f"{instruction} ({topic})", "input": "", "output": output})
    del items[1]["output"]  # one malformed item per reply
    return "Here you go:\n```json\n" + json.dumps(items, indent=1) + "\n```"


class ScriptedServer(ScriptedOpenAI):
    """A chat-completions server: replies computed from the prompt, faults by arrival order."""

    def __init__(self) -> None:
        self.prompts: list[str] = []  # every HTTP request's prompt, in arrival order
        self.faults: list[str] = []  # actions for the next arrivals: 429, 500, truncated, garbage, short
        super().__init__()

    def respond(self, body: dict, number: int) -> Reply:
        prompt = body["messages"][-1]["content"]
        self.prompts.append(prompt)
        action = self.faults.pop(0) if self.faults else None
        if action in ("429", "500"):
            return Reply(status=int(action))
        if action == "garbage":
            text = "Sure! Here are some ideas: be creative."
        elif "JSON array" in prompt:
            text = topic_reply(prompt)
        else:
            text = numbered_reply(prompt, short=action == "short")
        usage = {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}
        return Reply(text, finish_reason="length" if action == "truncated" else "stop", usage=usage)


@pytest.fixture
def server():
    scripted = ScriptedServer()
    yield scripted
    scripted.close()


@pytest.fixture
def seeds(tmp_path) -> Path:
    path = tmp_path / "seeds.jsonl"
    rows = [
        {"id": f"seed_task_{i}", "instruction": ins, "instances": [{"input": inp, "output": out}]}
        for i, (ins, inp, out) in enumerate(SEEDS)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def cli_args(server: ScriptedServer, out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--url", server.url, "--model", "scripted", "--key-env", "IFT_TEST_NO_SUCH_KEY",
            "--num-tasks", "8", "--concurrency", "1", "--backoff", "0", "--seed", "7", *extra]  # fmt: skip


def generate(argv: list[str]) -> tuple[int, dict, list[dict], list[dict]]:
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    args = parser.parse_args(argv)
    code = run_generate(args)
    paths = GeneratePaths.of(args.out)
    summary = json.loads(paths.summary.read_text())
    records = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    log = [json.loads(line) for line in paths.requests.read_text().splitlines()]
    return code, summary, records, log


# --- parsing and filters -------------------------------------------------------------------------------------
def test_parse_numbered_continuation_markdown_and_noinput():
    text = (
        "Name a famous painter from Spain.\n4. Input:\n<noinput>\n4. Output:\nPablo Picasso.\n###\n"
        "**5. Instruction:** Sort the numbers in ascending order.\n**5. Input:**\n3, 1, 2\n**5. Output:**\n1, 2, 3\n"
        "###\n6. Instruction: Beyond the list, ignored.\n6. Input:\n<noinput>\n6. Output:\nx"
    )
    parsed = parse_numbered(text, first=4, last=5)
    assert parsed.status is ReplyStatus.ok and parsed.malformed == 0
    assert parsed.tasks == [
        Task("Name a famous painter from Spain.", "", "Pablo Picasso."),
        Task("Sort the numbers in ascending order.", "3, 1, 2", "1, 2, 3"),
    ]


def test_parse_numbered_malformed_and_bad_replies():
    missing_output = "4. Instruction: A task without an output.\n4. Input:\n<noinput>\n"
    good = "5. Instruction: Give a synonym of happy.\n5. Input:\n<noinput>\n5. Output:\nGlad"
    parsed = parse_numbered(missing_output + good, 4, 5)
    assert (parsed.status, len(parsed.tasks), parsed.malformed) == (ReplyStatus.ok, 1, 1)
    wrong_order = "4. Output: x\n4. Instruction: y\n4. Input: z\n" + good
    assert parse_numbered(wrong_order, 4, 5).malformed == 1
    assert parse_numbered(good, 4, 6).status is ReplyStatus.wrong_count  # 4 and 6 missing
    assert parse_numbered("I am sorry, I cannot do that.", 4, 6).status is ReplyStatus.unparseable
    assert parse_numbered("", 4, 6).status is ReplyStatus.unparseable


def test_numbered_prompt_round_trips_through_the_parser():
    examples = [Task("Say hello to the user politely:", "", "Hello!"), Task("Add the numbers.", "2 3", "5")]
    prompt = numbered_prompt(examples, num_tasks=5)
    assert "a set of 5 diverse" in prompt and prompt.endswith("###\n3. Instruction:")
    body = prompt.split("List of 5 tasks:\n", 1)[1]
    parsed = parse_numbered(body, first=1, last=2)
    assert parsed.tasks == [Task("Say hello to the user politely", "", "Hello!"), examples[1]]


def test_parse_topic_reply_uses_json_only():
    items = [{"instruction": "Define gravity.", "input": "", "output": "A force."}, {"instruction": "x"}]
    parsed = parse_topic_reply("```json\n" + json.dumps(items) + "\n```", count=2)
    assert parsed.status is ReplyStatus.ok and parsed.tasks == [Task("Define gravity.", "", "A force.")]
    assert parsed.malformed == 1
    assert parse_topic_reply(json.dumps(items), count=3).status is ReplyStatus.wrong_count
    trailing = "Sure:\n" + json.dumps(items[:1]) + "\nOutput:\n[1, 2]"
    assert parse_topic_reply(trailing, count=1).tasks == [Task("Define gravity.", "", "A force.")]
    assert parse_topic_reply('[__import__("os").getcwd()]', 1).status is ReplyStatus.unparseable
    assert parse_topic_reply("no json here", 1).status is ReplyStatus.unparseable
    assert parse_topic_reply('{"instruction": "a"}', 1).status is ReplyStatus.unparseable


@pytest.mark.parametrize(
    ("instruction", "output", "reason"),
    [
        ("Tell me a good joke.", "Why did the chicken cross the road?", None),
        ("Summarise the text.", "Done.", "filter:alpaca_length"),  # <= 3 words, as Alpaca
        ("Create a diagram of the water cycle.", "No.", "filter:alpaca_blacklist"),
        ("Write a program that sorts a list.", "sorted(x)", "filter:alpaca_blacklist"),
        ('"Quote" this sentence for me please.', "OK.", "filter:alpaca_punctuation"),
        ("Éxplain the meaning of this word.", "OK.", "filter:alpaca_non_ascii"),
        # CJK: counted by characters, may start non-ASCII
        ("请解释一下光合作用的过程。", "植物利用光能。", None),
        ("Name the largest planet please.", "  ", "invalid:empty_assistant"),
    ],
)
def test_tasks_must_be_valid_records_and_pass_the_alpaca_filters(instruction, output, reason):
    filters = Filters(GenerateSettings(num_instructions=1).filters)
    assert task_problem(Task(instruction, "", output), filters, "gen.jsonl") == reason


def test_rouge_pool_matches_rouge_score_and_handles_chinese():
    pool = RougePool(threshold=0.7)
    pool.add("Give three tips for staying healthy.")
    pool.add("Translate the sentence into French.")
    candidate = "Give three tips for staying healthy at work."
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(pool.texts[0], candidate)["rougeL"].fmeasure
    assert pool.most_similar(candidate) == (pytest.approx(expected), pool.texts[0]) and expected >= 0.7
    assert pool.most_similar("Name an ocean.")[0] < 0.7
    pool.add("请给出三个保持健康的建议。")
    score, match = pool.most_similar("请给出三个保持健康的小建议。")  # the stock tokenizer would score 0
    assert match == "请给出三个保持健康的建议。" and score >= 0.7
    assert pool.most_similar("介绍一下长城的历史。")[0] < 0.7


def test_read_tasks_reads_self_instruct_seed_files(seeds):
    tasks = read_tasks(seeds)
    assert tasks[1] == Task(*SEEDS[1]) and len(tasks) == len(SEEDS)


# --- against the scripted server -----------------------------------------------------------------------------
def test_retries_bad_replies_filters_and_rouge_exact_counts(server, seeds, tmp_path):
    # 1st request: 429, 500, then a truncated reply; 2nd: garbage; 3rd: two tasks of five; then good replies.
    server.faults = ["429", "500", "truncated", "garbage", "short"]
    out = tmp_path / "gen.jsonl"
    code, summary, records, log = generate(cli_args(server, out, "--seeds", str(seeds), "--num-instructions", "5",
                                                    "--max-bad-replies", "3", "--price-in", "2", "--price-out", "10"))  # fmt: skip
    assert code == 0, summary
    # Each good reply: 5 tasks, 2 kept, 1 blacklisted, 2 ROUGE copies (of a seed, of the reply's first task).
    assert summary["replies"] == {"ok": 3, "truncated": 1, "unparseable": 1, "wrong_count": 1}
    assert summary["accepted"] == 5 and summary["surplus"] == 1 and summary["records"] == 5
    assert summary["rejected"] == {"rouge": 6, "filter:alpaca_blacklist": 3}
    calls = summary["this_run"]["calls"]
    assert (calls["requests"], calls["retries"], calls["rate_limited"], calls["server_errors"]) == (
        8,
        2,
        1,
        1,
    )
    assert summary["this_run"]["bad_replies"] == 3 and summary["stopped"] == "done"
    assert [e["request"] for e in log] == list(range(6)) and len(server.prompts) == 8
    assert summary["tokens_in"] == 600 and summary["tokens_out"] == 300
    assert summary["cost"] == pytest.approx((600 * 2 + 300 * 10) / 1e6)
    assert [e["records"] for e in log if e["accepted"]] == [[0, 2], [2, 4], [4, 5]]
    assert len({r["instruction"] for r in records}) == 5 and all(r["input"] == "" for r in records)
    scan = open_source(SourceConfig(path=str(out))).scan()  # what `ift data validate` reads
    assert scan.bad == [] and len(scan.valid_indices) == 5 and scan.formats == {str(out): "alpaca"}


def test_bad_reply_budget_stops_the_run(server, seeds, tmp_path):
    server.faults = ["garbage", "short", "truncated"]
    out = tmp_path / "gen.jsonl"
    code, summary, records, log = generate(
        cli_args(server, out, "--seeds", str(seeds), "--num-instructions", "5", "--max-bad-replies", "2")
    )
    assert code == 1 and summary["stopped"] == "bad_replies" and records == [] and len(server.prompts) == 3
    assert [e["status"] for e in log] == ["unparseable", "wrong_count", "truncated"]
    # The same command continues with a fresh budget, after the logged requests.
    code, summary, records, log = generate(
        cli_args(server, out, "--seeds", str(seeds), "--num-instructions", "3", "--max-bad-replies", "2")
    )
    assert code == 0 and len(records) == 3 and [e["request"] for e in log] == [0, 1, 2, 3, 4]
    assert summary["replies"] == {"ok": 2, "unparseable": 1, "wrong_count": 1, "truncated": 1}


def test_topic_mode(server, tmp_path):
    topics = tmp_path / "topics.txt"
    topics.write_text("astronomy\n\ncooking\n")
    out = tmp_path / "topics.jsonl"
    code, summary, records, log = generate(
        cli_args(server, out, "--topics", str(topics), "--per-topic", "3", "--num-instructions", "4")
    )
    assert code == 0 and [e["topic"] for e in log] == ["astronomy", "cooking"]
    assert summary["rejected"] == {"malformed": 2} and summary["accepted"] == 4
    topics_of_records = ["astronomy"] * 2 + ["cooking"] * 2
    assert all(r["instruction"].endswith(f"({t})") for r, t in zip(records, topics_of_records, strict=True))


def test_resume_after_kill_has_no_duplicates_and_no_repeated_calls(server, seeds, tmp_path):
    argv = ["--seeds", str(seeds), "--num-instructions", "6"]
    reference = ScriptedServer()  # an uninterrupted run, for comparison
    try:
        code, _, expected, _ = generate(cli_args(reference, tmp_path / "ref" / "gen.jsonl", *argv))
        assert code == 0 and len(reference.prompts) == 3
    finally:
        reference.close()
    out = tmp_path / "run" / "gen.jsonl"
    server.hold_after = 2  # the third request never comes back: the process is killed waiting for it
    script = (
        "import argparse, sys\nfrom ift_dist.data.generate_cli import add_generate_arguments, run_generate\n"
    )
    script += (
        "p = argparse.ArgumentParser(); add_generate_arguments(p); sys.exit(run_generate(p.parse_args()))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", script, *cli_args(server, out, *argv)], env=env)
    try:
        assert server.held.wait(60), "the generator never reached the third request"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    assert len(out.read_text().splitlines()) == 4
    server.hold_after = None
    server.release.set()
    code, summary, records, log = generate(cli_args(server, out, *argv))
    assert code == 0 and records == expected
    assert [e["request"] for e in log] == [0, 1, 2] and summary["this_run"]["calls"]["requests"] == 1
    # Every prompt asked once, except the one in flight at the kill.
    assert server.prompts == reference.prompts[:3] + reference.prompts[2:3]
