"""Self-Instruct / Stanford Alpaca generation: grows an Alpaca JSONL file from seed tasks through an LLM, one
numbered-list (or topic JSON) request at a time, keeping only tasks that pass the filters and are ROUGE-L-dissimilar
to every task already kept.

The procedure (Wang et al. 2022, as Stanford Alpaca's generate_instruction.py runs it): request i shows k seed tasks
sampled with Random(f"{seed}:{i}") as tasks 1..k and asks the model to continue the list up to `num_tasks`; the reply
is parsed into (instruction, input, output) blocks; a task must be a valid Alpaca record and pass the quality filters
(by default the Alpaca heuristics: nothing a text model cannot do, not too short or long), and is kept only if its
instruction's ROUGE-L F1 with every seed and every kept instruction is below `rouge_threshold` (0.7). Topic mode asks for `per_topic` records about topic i mod len(topics) as a JSON
array instead.

Resumable without repeats: every request's prompt depends only on (seed, i); accepted records are appended to the
output (fsynced) before the request's log line, and the next run starts at the first request index not in the log,
with the ROUGE pool seeded by the output. A reply that came back but was not logged before a kill is served by the
judge client's cache (keyed by the request index), and its tasks, already in the output, are ROUGE duplicates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ift_dist.config.quality_schema import FilterConfig
from ift_dist.data.quality.texts import is_cjk
from ift_dist.data.selfinstruct_prompts import (
    ALPACA_PROMPT,
    ParsedReply,
    ReplyStatus,
    Task,
    numbered_prompt,
    parse_numbered,
    parse_topic_reply,
    topic_prompt,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateSettings:
    num_instructions: int  # the output holds this many records when the run ends well
    seed: int = 0
    num_prompt_tasks: int = 3  # k seed tasks shown per request
    num_tasks: int = 20  # the list length asked for (examples included): num_tasks - k new tasks per reply
    topics: tuple[str, ...] = ()  # non-empty: topic mode
    per_topic: int = 5  # topic mode: records asked for per request
    rouge_threshold: float = 0.7  # kept only if ROUGE-L F1 with every pooled instruction is below this
    max_bad_replies: int = 10  # per run; one more stops the run (exit 1, a rerun continues)
    max_requests: int = 0  # per run; 0 = no limit
    batch: int = 1  # requests sent at once (the client's concurrency); replies are handled in request order
    price_in: float = 0.0  # per 1M prompt tokens
    price_out: float = 0.0  # per 1M completion tokens
    template: str = ALPACA_PROMPT  # numbered mode, with a {num_tasks} placeholder
    # The quality filters a task must pass (ift_dist/data/quality/filters.py): Stanford Alpaca's heuristics.
    filters: FilterConfig = field(default_factory=lambda: FilterConfig(alpaca_heuristics=True))


@dataclass(frozen=True)
class GeneratePaths:
    """Every file of one generation, named after the output: the one place these names are spelled."""

    out: Path
    requests: Path  # one JSON line per request
    summary: Path
    cache: Path  # the judge client's reply cache

    @classmethod
    def of(cls, out: Path) -> GeneratePaths:
        stem = out.with_suffix("") if out.suffix == ".jsonl" else out
        return cls(
            out, Path(f"{stem}.requests.jsonl"), Path(f"{stem}.summary.json"), Path(f"{stem}.cache.jsonl")
        )


# --- ROUGE-L pool ----------------------------------------------------------------------------------------------
_CJK_TOKEN = re.compile(r"[a-z0-9]+|[^\W_a-z0-9]")


class RougePool:
    """The instructions kept so far, tokenized once; `most_similar` is ROUGE-L F1 (rouge-score) against each.

    rouge-score's tokenizer keeps only [a-z0-9] runs, so Chinese text would tokenize to nothing and never match:
    CJK text is tokenized into characters (ASCII words stay words) instead."""

    def __init__(self, threshold: float):
        from rouge_score import rouge_scorer, tokenizers

        pool = self
        self.threshold = threshold
        self.texts: list[str] = []
        self._tokens: dict[str, list[str]] = {}
        self._counts: dict[str, Counter[str]] = {}  # pooled text -> its token counts
        default = tokenizers.DefaultTokenizer(use_stemmer=False)

        class _Cached(tokenizers.Tokenizer):  # the pool's texts are scored many times: tokenize each once
            def tokenize(self, text: str) -> list[str]:
                tokens = pool._tokens.get(text)
                if tokens is None:
                    tokens = _CJK_TOKEN.findall(text.lower()) if is_cjk(text) else default.tokenize(text)
                    pool._tokens[text] = tokens
                return tokens

        self._tokenizer = _Cached()
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=self._tokenizer)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> None:
        self._counts.setdefault(text, Counter(self._tokenizer.tokenize(text)))
        self.texts.append(text)

    def most_similar(self, text: str) -> tuple[float, str | None]:
        """(ROUGE-L F1, pooled text) of the most similar pooled text, stopping at the first one at or above the
                threshold. F1 = 2 LCS / (m + n) for token counts m, n: a pooled text whose length or shared tokens bound this below
        the best so far is skipped without computing its LCS."""
        tokens = self._tokenizer.tokenize(text)
        counts, m = Counter(tokens), len(tokens)
        best, match = 0.0, None
        for other in self.texts:
            n = len(self._tokens[other])
            # The LCS is at most the tokens both share; the Counter intersection is much cheaper than the LCS table.
            if m + n == 0 or 2 * min(m, n) / (m + n) < max(best, 1e-9):
                continue
            if 2 * (counts & self._counts[other]).total() / (m + n) < max(best, 1e-9):
                continue
            score = self._scorer.score(other, text)["rougeL"].fmeasure
            if score > best:
                best, match = score, other
                if best >= self.threshold:
                    break
        return best, match


# --- records ---------------------------------------------------------------------------------------------------
def read_tasks(path: Path) -> list[Task]:
    """Seed tasks from any file `ift data` reads (Self-Instruct's seed_tasks.jsonl with `instances`, Alpaca
    JSON/JSONL, ...): the first user turn as instruction (Alpaca records: instruction and input kept apart) and
    the first assistant turn as output. Bad records are skipped with a warning."""
    from ift_dist.config.data_schema import SourceConfig
    from ift_dist.data.sources import open_source

    source = open_source(SourceConfig(path=str(path)))
    scan = source.scan()
    for bad in scan.bad[:5]:
        logger.warning("seed skipped: %s", bad)
    tasks = []
    for index in scan.valid_indices:
        conversation = source.get(int(index))
        user = next(m for m in conversation.messages if m.role == "user")
        answer = next(m for m in conversation.messages if m.role == "assistant")
        instruction, given_input = user.alpaca or (user.content, "")
        tasks.append(Task(instruction, given_input, answer.content))
    return tasks


def read_output(path: Path) -> list[Task]:
    """The records an earlier run wrote; a line a kill left half-written (the last one, without a newline) is cut
    off the file, so that the next record starts on a line of its own."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) != len(raw):
        logger.warning("%s: removing a half-written last line left by a killed run", path)
        with path.open("r+b") as file:
            file.truncate(len(complete))
    return [Task(**json.loads(line)) for line in complete.decode("utf-8").splitlines() if line.strip()]


def task_problem(task: Task, filters: Any, name: str) -> str | None:
    """Why the task is not kept as a record: "invalid:<reason>" (what `ift data validate` would report) or the
    quality filter it fails ("filter:<rule>", ift_dist/data/quality/filters.py); None if neither."""
    from ift_dist.config.data_schema import SourceConfig
    from ift_dist.data.contracts import BadRecord, SampleRef
    from ift_dist.data.quality.texts import QualityText
    from ift_dist.data.records import to_conversation

    result = to_conversation(
        task.to_json(),
        fmt="alpaca",
        source=SourceConfig(path=name),
        ref=SampleRef(name, 0),
        file=name,
        location="",
    )
    if isinstance(result, BadRecord):
        return f"invalid:{result.reason}"
    removal = filters.check(QualityText.of(result))
    return removal.reason if removal else None


# --- requests --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRequest:
    index: int
    messages: tuple[dict[str, str], ...]
    examples: tuple[int, ...]  # the seed tasks shown, by index
    topic: str | None = None

    @property
    def prompt_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.messages, ensure_ascii=False).encode()).hexdigest()[:16]


def plan_request(index: int, settings: GenerateSettings, seeds: Sequence[Task]) -> PlannedRequest:
    """Request `index`'s prompt: a function of (seed, index) only, so a resumed run asks what the killed one would
    have asked."""
    rng = random.Random(f"{settings.seed}:{index}")
    shown = tuple(sorted(rng.sample(range(len(seeds)), min(settings.num_prompt_tasks, len(seeds)))))
    examples = [seeds[i] for i in shown]
    if settings.topics:
        topic = settings.topics[index % len(settings.topics)]
        prompt = topic_prompt(topic, settings.per_topic, examples)
    else:
        topic, prompt = None, numbered_prompt(examples, settings.num_tasks, settings.template)
    return PlannedRequest(index, ({"role": "user", "content": prompt},), shown, topic)


def parse_reply(text: str, settings: GenerateSettings) -> ParsedReply:
    if settings.topics:
        return parse_topic_reply(text, settings.per_topic)
    return parse_numbered(text, settings.num_prompt_tasks + 1, settings.num_tasks)


@dataclass
class RunState:
    """What this run has kept and spent; `kept` starts with the output an earlier run left."""

    kept: list[Task]
    pool: RougePool
    next_index: int
    filters: Any  # ift_dist.data.quality.filters.Filters of settings.filters
    bad_replies: int = 0
    requests: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)  # this run's request log entries


def judge_reply(
    text: str, finish_reason: str | None, settings: GenerateSettings, state: RunState, out_name: str
) -> tuple[ReplyStatus, list[Task], Counter[str], int]:
    """(status, tasks accepted, rejections by reason, surplus) of one reply; accepted tasks join the pool. Surplus:
    good tasks beyond num_instructions, not written."""
    rejected: Counter[str] = Counter()
    if finish_reason == "length":
        return ReplyStatus.truncated, [], rejected, 0
    parsed = parse_reply(text, settings)
    if parsed.status is not ReplyStatus.ok:
        return parsed.status, [], rejected, 0
    rejected["malformed"] += parsed.malformed
    accepted, surplus = [], 0
    for task in parsed.tasks:
        reason = task_problem(task, state.filters, out_name)
        if reason is None and state.pool.most_similar(task.instruction)[0] >= settings.rouge_threshold:
            reason = "rouge"
        if reason:
            rejected[reason] += 1
        elif len(state.kept) + len(accepted) >= settings.num_instructions:
            surplus += 1
        else:
            accepted.append(task)
            state.pool.add(task.instruction)
    return ReplyStatus.ok, accepted, +rejected, surplus


def next_request_index(requests_path: Path) -> int:
    """One past the highest request index logged (0 for a new run); torn lines of a killed run are skipped."""
    last = -1
    if requests_path.is_file():
        for line in requests_path.read_text(encoding="utf-8").splitlines():
            try:
                last = max(last, int(json.loads(line)["request"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return last + 1


def _append(path: Path):
    """`path` opened for appending, a newline first if a killed run left a line without one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as file:
            file.seek(-1, 2)
            torn = file.read(1) != b"\n"
        if torn:
            with path.open("ab") as file:
                file.write(b"\n")
    return path.open("a", encoding="utf-8")


def _write_lines(file: Any, rows: Sequence[dict[str, Any]]) -> None:
    import os

    if rows:  # one write per request, fsynced: a kill loses at most the request being handled
        file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        file.flush()
        os.fsync(file.fileno())


def generate(
    client: Any, settings: GenerateSettings, seeds: Sequence[Task], paths: GeneratePaths
) -> RunState:
    """Requests until the output holds num_instructions records, more than max_bad_replies bad replies came back,
    or max_requests were sent; `client` is an ift_dist.eval.judge_client.JudgeClient (its concurrency = batch)."""
    from ift_dist.data.quality.filters import Filters
    from ift_dist.eval.judge_client import JudgeRequest, cache_key

    kept = read_output(paths.out)
    pool = RougePool(settings.rouge_threshold)
    for task in [*seeds, *kept]:
        pool.add(task.instruction)
    state = RunState(kept, pool, next_request_index(paths.requests), Filters(settings.filters))
    endpoint = client.endpoint
    with _append(paths.out) as out, _append(paths.requests) as log:
        while len(state.kept) < settings.num_instructions and state.bad_replies <= settings.max_bad_replies:
            size = settings.batch
            if settings.max_requests:
                size = min(size, settings.max_requests - state.requests)
            if size <= 0:
                break
            plans = [plan_request(state.next_index + j, settings, seeds) for j in range(size)]
            replies = client.ask_all([JudgeRequest(plan.messages, repeat=plan.index) for plan in plans])
            for plan, reply in zip(plans, replies, strict=True):
                # The finish reason and token usage travel in the cache entry the client wrote for this reply.
                key = cache_key(endpoint.model, plan.messages, endpoint.sampling(), plan.index)
                details = (client.cache.get(key) or {}) if reply.text is not None else {}
                usage = details.get("usage") or {}
                tokens_in, tokens_out = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
                if reply.text is None:
                    status, accepted, rejected, surplus = ReplyStatus.call_failed, [], Counter(), 0
                else:
                    status, accepted, rejected, surplus = judge_reply(
                        reply.text, details.get("finish_reason"), settings, state, paths.out.name
                    )
                start = len(state.kept)
                _write_lines(out, [task.to_json() for task in accepted])
                state.kept.extend(accepted)
                entry = {
                    "request": plan.index, "prompt_hash": plan.prompt_hash, "topic": plan.topic,
                    "examples": list(plan.examples), "cached": reply.cached, "status": status.value,
                    "error": reply.error, "finish_reason": details.get("finish_reason"),
                    "tokens_in": tokens_in, "tokens_out": tokens_out,
                    "cost": (tokens_in * settings.price_in + tokens_out * settings.price_out) / 1e6,
                    "accepted": len(accepted), "records": [start, len(state.kept)],
                    "rejected": dict(sorted(rejected.items())), "surplus": surplus,
                }  # fmt: skip
                _write_lines(log, [entry])
                state.log.append(entry)
                state.bad_replies += status is not ReplyStatus.ok
                if status is not ReplyStatus.ok:
                    logger.warning(
                        "request %d: %s reply (%d bad so far)", plan.index, status, state.bad_replies
                    )
            state.next_index += size
            state.requests += size
    return state
