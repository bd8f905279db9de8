"""`ift data generate`: its options, the run of ift_dist/data/selfinstruct.py they configure, and the summary.

Files, all named after --out (selfinstruct.GeneratePaths): OUT (Alpaca JSONL, appended), OUT.requests.jsonl (one
line per request: id, prompt hash, tokens, cost, status, accepted/rejected counts and reasons), OUT.summary.json
(totals over every run of this output, and this run's call counters) and OUT.cache.jsonl (the replies).

Exit codes: 0 the output holds --num-instructions records; 1 the run stopped early (more than --max-bad-replies bad
replies, or --max-requests sent): the same command continues where it stopped; 2 bad options or seed file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ift_dist import exit_codes

logger = logging.getLogger(__name__)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ift data generate`."""
    add = parser.add_argument
    add(
        "--seeds",
        type=Path,
        help="seed tasks: Self-Instruct seed_tasks.jsonl or any Alpaca file (topic mode: optional)",
    )
    add(
        "--topics",
        type=Path,
        help="topic mode: a file with one topic per line; asks --per-topic records per request",
    )
    add("--out", type=Path, required=True, help="Alpaca JSONL to grow; an existing one is continued")
    add(
        "--url",
        default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        help="base URL of an OpenAI-compatible API (default: $OPENAI_BASE_URL, else OpenAI's)",
    )
    add("--model", required=True, help="the generating model's name on that server")
    add(
        "--key-env", default="OPENAI_API_KEY", help="environment variable holding the API key (unset: no key)"
    )
    add("--num-instructions", type=int, required=True, help="records the output should hold at the end")
    add("--num-prompt-tasks", type=int, default=3, help="seed tasks shown per request (Alpaca: 3)")
    add(
        "--num-tasks",
        type=int,
        default=20,
        help="numbered list length asked for, examples included (Alpaca: 20)",
    )
    add("--per-topic", type=int, default=5, help="topic mode: records asked for per request")
    add(
        "--prompt-file",
        type=Path,
        help="numbered-mode prompt with a {num_tasks} placeholder (default: Alpaca's)",
    )
    add("--seed", type=int, default=0, help="request i samples its seed tasks with Random(f'{seed}:{i}')")
    add("--temperature", type=float, default=1.0, help="Alpaca used 1.0")
    add("--max-tokens", type=int, default=3072, help="per reply; a reply cut at this length is a bad reply")
    add("--concurrency", type=int, default=4, help="requests in flight; replies are handled in request order")
    add("--timeout", type=float, default=120.0, help="seconds per HTTP request before a retry")
    add("--max-retries", type=int, default=6, help="per request, on 429, 5xx, timeouts")
    add("--backoff", type=float, default=1.0, help="seconds before the first retry, doubling")
    add(
        "--max-bad-replies",
        type=int,
        default=10,
        help="unparseable, truncated, wrong-count or failed replies tolerated per run; one more stops it",
    )
    add("--max-requests", type=int, default=0, help="requests per run (0: no limit)")
    add(
        "--rouge-threshold", type=float, default=0.7, help="kept only if ROUGE-L with every kept one is below"
    )
    add("--price-in", type=float, default=0.0, help="price per 1M prompt tokens, for the cost column")
    add("--price-out", type=float, default=0.0, help="price per 1M completion tokens")
    add("--cache", type=Path, help="reply cache (default: OUT.cache.jsonl)")  # fmt: skip


def _problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.seeds is None and args.topics is None:
        problems.append("--seeds is needed (or --topics for topic mode)")
    if args.num_instructions < 1 or args.per_topic < 1 or args.concurrency < 1:
        problems.append("--num-instructions, --per-topic and --concurrency must be >= 1")
    if args.topics is None and not 0 < args.num_prompt_tasks < args.num_tasks:
        problems.append(f"--num-prompt-tasks must be in 1..{args.num_tasks - 1} (below --num-tasks)")
    if min(args.max_bad_replies, args.max_requests, args.max_retries) < 0:
        problems.append("--max-bad-replies, --max-requests and --max-retries must be >= 0")
    if not 0 < args.rouge_threshold <= 1:
        problems.append("--rouge-threshold must be in (0, 1]")
    return problems


def summarize(requests_path: Path, records: int, num_instructions: int) -> dict[str, Any]:
    """Totals over every request logged for this output, by every run."""
    entries = [
        json.loads(line) for line in requests_path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    rejected: Counter[str] = Counter()
    for entry in entries:
        rejected.update(entry["rejected"])
    return {
        "records": records,
        "num_instructions": num_instructions,
        "requests": len(entries),
        "cached_replies": sum(e["cached"] for e in entries),
        "replies": dict(Counter(e["status"] for e in entries).most_common()),
        "accepted": sum(e["accepted"] for e in entries),
        "rejected": dict(rejected.most_common()),
        "surplus": sum(e["surplus"] for e in entries),
        "tokens_in": sum(e["tokens_in"] for e in entries),
        "tokens_out": sum(e["tokens_out"] for e in entries),
        "cost": sum(e["cost"] for e in entries),
    }


def run_generate(args: argparse.Namespace) -> int:
    """`ift data generate`: the exit code (see the module docstring)."""
    from ift_dist.data.contracts import DataFileError
    from ift_dist.data.selfinstruct import GeneratePaths, GenerateSettings, generate, read_tasks
    from ift_dist.data.selfinstruct_prompts import ALPACA_PROMPT
    from ift_dist.eval.judge_client import JudgeClient, endpoint_from_args

    problems = _problems(args)
    try:
        seeds = read_tasks(args.seeds) if args.seeds else []
        topics = (
            [t.strip() for t in args.topics.read_text(encoding="utf-8").splitlines()] if args.topics else []
        )
        template = args.prompt_file.read_text(encoding="utf-8") if args.prompt_file else ALPACA_PROMPT
    except (OSError, DataFileError) as exc:
        problems.append(str(exc))
        seeds, topics, template = [], [], ALPACA_PROMPT
    topics = [t for t in topics if t]
    if args.topics and not topics:
        problems.append(f"--topics {args.topics}: no topic in it")
    if not args.topics and len(seeds) < args.num_prompt_tasks:
        problems.append(f"--seeds: {len(seeds)} valid seed tasks, fewer than --num-prompt-tasks")
    if "{num_tasks}" not in template:
        problems.append("--prompt-file: the {num_tasks} placeholder is missing")
    if problems:
        logger.error("ift data generate: %s", "; ".join(problems))
        return exit_codes.CONFIG_ERROR
    settings = GenerateSettings(
        num_instructions=args.num_instructions,
        seed=args.seed,
        num_prompt_tasks=args.num_prompt_tasks,
        num_tasks=args.num_tasks,
        topics=tuple(topics),
        per_topic=args.per_topic,
        rouge_threshold=args.rouge_threshold,
        max_bad_replies=args.max_bad_replies,
        max_requests=args.max_requests,
        batch=args.concurrency,
        price_in=args.price_in,
        price_out=args.price_out,
        template=template,
    )
    endpoint = endpoint_from_args(args, url=args.url, model=args.model, key_env=args.key_env)
    paths = GeneratePaths.of(args.out)
    with JudgeClient(endpoint, args.cache or paths.cache) as client:
        state = generate(client, settings, seeds, paths)
        calls = asdict(client.counters)
    done = len(state.kept) >= settings.num_instructions
    summary = (
        summarize(paths.requests, len(state.kept), settings.num_instructions)
        if paths.requests.is_file()
        else {}
    )
    summary["this_run"] = {"requests": state.requests, "bad_replies": state.bad_replies, "calls": calls}
    summary["stopped"] = (
        "done" if done else "bad_replies" if state.bad_replies > settings.max_bad_replies else "max_requests"
    )
    summary["endpoint"] = {**asdict(endpoint), "api_key": None}  # never written to disk
    summary["settings"] = {**asdict(settings), "template": "custom" if args.prompt_file else "alpaca"}
    paths.summary.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(
        f"{len(state.kept)}/{settings.num_instructions} records in {paths.out}; this run: {state.requests} requests, "
        f"{state.bad_replies} bad replies; rejected {summary.get('rejected', {})}; summary in {paths.summary}"
    )
    if not done:
        logger.error("ift data generate stopped early (%s); the same command continues", summary["stopped"])
        return exit_codes.FAILED
    return exit_codes.OK
