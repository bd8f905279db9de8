"""Calls to an OpenAI-compatible chat-completions judge: retries with backoff, a thread pool, a disk cache, counters.

Every reply is appended to the cache file (one JSON line, flushed and fsynced) the moment it arrives, so a run that
is killed and restarted pays only for the calls that had not come back. The cache key is the judge model, the full
messages, the sampling parameters and the repeat index (so `--repeats N` asks N distinct times); the URL is not in
the key, so the same model behind another server reuses the entries. Failed calls are never cached: a rerun retries
them. Unparseable replies are cached like any other: they were paid for, and at temperature 0 they would come back
the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# A key for servers that need none (transformers serve, vLLM without --api-key): the openai client insists on one.
NO_KEY = "EMPTY"


@dataclass(frozen=True)
class JudgeEndpoint:
    """Where the judge is and how it is asked."""

    url: str  # base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1
    model: str  # the judge model's name as the server knows it
    api_key: str | None  # None: a local server without authentication
    temperature: float = 0.0  # 0: the judge's most likely verdict, reproducible
    max_tokens: int = 2048  # the judge's explanation plus verdict; MT-bench used 2048
    timeout_s: float = 120.0  # one HTTP request, after which it counts as a timeout and is retried
    max_retries: int = 6  # retries after the first attempt, for 429, 5xx, timeouts and lost connections
    backoff_s: float = 1.0  # the first retry waits this long, each later one twice the one before
    max_backoff_s: float = 60.0  # upper bound of one wait, also of a server's Retry-After
    concurrency: int = 4  # requests in flight at once

    def sampling(self) -> dict[str, Any]:
        """The sampling parameters sent with every request (and part of the cache key)."""
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}


@dataclass(frozen=True)
class JudgeRequest:
    messages: tuple[dict[str, str], ...]
    repeat: int = 0  # 0..repeats-1: the same messages asked again get a cache entry of their own


@dataclass(frozen=True)
class JudgeReply:
    text: str | None  # the judge's reply; None when the call failed for good
    cached: bool  # came from the cache, nothing paid
    error: str | None = None  # why the call failed (the last error), when text is None


@dataclass
class CallCounters:
    """What the judge calls cost and how they went; written into judge_results.json."""

    requests: int = 0  # HTTP requests sent, retries included
    completed: int = 0  # replies received (paid for), not counting cache hits
    cache_hits: int = 0
    retries: int = 0  # attempts after a failed one
    rate_limited: int = 0  # 429 replies
    server_errors: int = 0  # 5xx (and 408/409) replies
    timeouts: int = 0  # requests that ran past timeout_s
    connection_errors: int = 0  # refused or dropped connections
    failed: int = 0  # calls given up: retries exhausted or an error a retry cannot fix (400, 401, 404)


def endpoint_from_args(args: Any, *, url: str, model: str, key_env: str) -> JudgeEndpoint:
    """The endpoint a command's options describe: its --temperature, --max-tokens, --timeout, --max-retries,
    --backoff and --concurrency (`ift eval judge`, `ift data generate`); the key from the variable `key_env`."""
    return JudgeEndpoint(
        url=url,
        model=model,
        api_key=os.environ.get(key_env) or None,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout,
        max_retries=args.max_retries,
        backoff_s=args.backoff,
        concurrency=args.concurrency,
    )


def cache_key(model: str, messages: Sequence[dict[str, str]], sampling: dict[str, Any], repeat: int) -> str:
    payload = {"model": model, "messages": list(messages), "sampling": sampling, "repeat": repeat}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class JudgeCache:
    """Judge replies by cache key, loaded from and appended to one JSONL file; safe to share between threads."""

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.torn_lines = 0  # lines a killed run left half-written, skipped
        if path.is_file():
            self._load()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def _load(self) -> None:
        raw = self.path.read_text(encoding="utf-8")
        for line in raw.splitlines():
            try:
                entry = json.loads(line)
                self._entries[entry["key"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError):
                self.torn_lines += 1
        if self.torn_lines:
            logger.warning("%s: skipped %d unreadable line(s), a killed run's", self.path, self.torn_lines)
        if raw and not raw.endswith("\n"):
            # A kill mid-write left no newline: the next entry must start on a line of its own.
            with self.path.open("a", encoding="utf-8") as file:
                file.write("\n")

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            self._entries[entry["key"]] = entry
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class JudgeClient:
    """Asks the judge, through the cache; counts every request, retry and failure."""

    def __init__(
        self, endpoint: JudgeEndpoint, cache_path: Path, sleep: Callable[[float], None] = time.sleep
    ):
        import openai  # lazy: `ift --help` stays quick

        self.endpoint = endpoint
        self.cache = JudgeCache(cache_path)
        self.counters = CallCounters()
        self._sleep = sleep
        self._lock = threading.Lock()
        # max_retries=0: the retry loop is ours, so that every retry is counted and the backoff is documented.
        self._client = openai.OpenAI(
            base_url=endpoint.url,
            api_key=endpoint.api_key or NO_KEY,
            max_retries=0,
            timeout=endpoint.timeout_s,
        )

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.cache.close()
        self._client.close()

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.counters, name, getattr(self.counters, name) + 1)

    def ask_all(self, requests: Sequence[JudgeRequest]) -> list[JudgeReply]:
        """The replies in request order, at most endpoint.concurrency requests in flight."""
        if self.endpoint.concurrency <= 1:
            return [self.ask(request) for request in requests]
        with ThreadPoolExecutor(max_workers=self.endpoint.concurrency, thread_name_prefix="judge") as pool:
            return list(pool.map(self.ask, requests))

    def ask(self, request: JudgeRequest) -> JudgeReply:
        endpoint = self.endpoint
        key = cache_key(endpoint.model, request.messages, endpoint.sampling(), request.repeat)
        entry = self.cache.get(key)
        if entry is not None:
            self._count("cache_hits")
            return JudgeReply(entry["text"], cached=True)
        text, details, error = self._call_with_retries(request.messages)
        if text is None:
            self._count("failed")
            return JudgeReply(None, cached=False, error=error)
        self._count("completed")
        self.cache.put(
            {"key": key, "model": endpoint.model, "repeat": request.repeat, "text": text, **details}
        )
        return JudgeReply(text, cached=False)

    def _call_with_retries(
        self, messages: Sequence[dict[str, str]]
    ) -> tuple[str | None, dict[str, Any], str]:
        """(reply text, finish reason and usage, "") or (None, {}, the last error)."""
        import openai

        endpoint = self.endpoint
        error = ""
        for attempt in range(endpoint.max_retries + 1):
            if attempt:
                self._count("retries")
            self._count("requests")
            retry_after = 0.0
            try:
                response = self._client.chat.completions.create(
                    model=endpoint.model, messages=list(messages), **endpoint.sampling()
                )
            except openai.RateLimitError as exc:
                self._count("rate_limited")
                error, retry_after = f"429: {exc}", _retry_after_s(exc)
            except openai.APITimeoutError as exc:  # before APIConnectionError, its base class
                self._count("timeouts")
                error = f"timeout after {endpoint.timeout_s} s: {exc}"
            except openai.APIConnectionError as exc:
                self._count("connection_errors")
                error = f"connection: {exc}"
            except openai.APIStatusError as exc:
                if exc.status_code < 500 and exc.status_code not in (408, 409):
                    # A bad request, key or model name: asking again cannot help.
                    return None, {}, f"{exc.status_code}: {exc}"
                self._count("server_errors")
                error = f"{exc.status_code}: {exc}"
            else:
                if response.choices:
                    choice = response.choices[0]
                    usage = response.usage.model_dump() if response.usage else None
                    return (
                        choice.message.content or "",
                        {"finish_reason": choice.finish_reason, "usage": usage},
                        "",
                    )
                self._count("server_errors")
                error = "a reply without choices"
            if attempt < endpoint.max_retries:
                backoff = endpoint.backoff_s * 2**attempt
                self._sleep(min(max(backoff, retry_after), endpoint.max_backoff_s))
        logger.warning("judge call failed after %d attempts: %s", endpoint.max_retries + 1, error)
        return None, {}, error


def _retry_after_s(exc: Any) -> float:
    """The server's Retry-After in seconds (0 when absent or a date)."""
    try:
        return float(exc.response.headers.get("retry-after", 0))
    except (AttributeError, ValueError):
        return 0.0
