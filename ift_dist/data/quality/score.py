"""AlpaGasus-style model scores: an OpenAI-compatible judge rates each record's answer 0-5 for accuracy, and records
scored below `data.quality.model_score.threshold` are removed as `low_score`.

The prompt is AlpaGasus's rating prompt for the accuracy dimension (Chen et al., "AlpaGasus: Training a Better Alpaca
with Fewer Data", ICLR 2024, arXiv:2307.08701, Figure 3): a system prompt that shows the instruction, input and
response, and a user prompt asking for a 0-5 score on a line of its own, then an explanation. AlpaGasus kept the
Alpaca records scored >= 4.5 (our default threshold).

Policy for records without a score: a call that failed for good (retries exhausted, a 4xx) and a reply with no
readable score both KEEP the record, counted as `failed` / `unparseable`; a judge outage must not silently empty a
data set. Failed calls are not cached, so the next run asks again; unparseable replies are (see judge_client).

Each distinct (instruction, input, response) is asked once: identical records share the reply. The judge's cache
makes a rerun free and its verdicts stable; run this on one rank and share the result, as the other stages are.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ift_dist.config.quality_schema import ModelScoreConfig
from ift_dist.data.contracts import SampleRef
from ift_dist.data.quality.texts import QualityText, Removal
from ift_dist.eval.judge_client import JudgeClient, JudgeEndpoint, JudgeRequest

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "We would like to request your feedback on the performance of AI assistant in response to the instruction "
    "and the given input displayed following.\n\nInstruction: {instruction}\nInput: {input}\nResponse: {response}"
)
USER_PROMPT = (
    "Please rate according to the accuracy of the response to the instruction and the input. Each assistant "
    "receives a score on a scale of 0 to 5, where a higher score indicates higher level of the accuracy. Please "
    "first output a single line containing value indicating the scores. In the subsequent line, please provide a "
    "comprehensive explanation of your evaluation, avoiding any potential bias."
)
MAX_SCORE = 5.0  # a number outside [0, MAX_SCORE] is not a score on the asked scale: unparseable

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_LABELLED = re.compile(r"score\s*[:：=]\s*\**\s*([-+]?\d+(?:\.\d+)?)", re.IGNORECASE)


@dataclass
class ScoreCounters:
    """What scoring cost and how it went (for the quality report)."""

    calls: int = 0  # HTTP requests sent to the judge, retries included; 0 on a fully cached rerun
    cache_hits: int = 0  # distinct prompts answered from the cache
    retries: int = 0  # attempts after a failed one (429, 5xx, timeouts, lost connections)
    failed: int = 0  # records whose call failed for good: kept, unscored
    unparseable: int = 0  # records whose reply held no score in [0, 5]: kept, unscored


@dataclass
class ScoreResult:
    scores: dict[SampleRef, float] = field(default_factory=dict)  # every record with a readable score
    unscored: list[SampleRef] = field(default_factory=list)  # failed or unparseable, in input order: kept
    counters: ScoreCounters = field(default_factory=ScoreCounters)
    removals: list[Removal] = field(default_factory=list)  # score < threshold, in input order


def judge_endpoint(cfg: ModelScoreConfig) -> JudgeEndpoint:
    """The judge as `cfg` names it: temperature 0 (reproducible), the API key read from `cfg.key_env` if set."""
    return JudgeEndpoint(
        url=cfg.url,
        model=cfg.model,
        api_key=os.environ.get(cfg.key_env) or None,
        max_tokens=cfg.max_tokens,
        concurrency=cfg.concurrency,
    )


def split_instruction(text: QualityText) -> tuple[str, str]:
    """(instruction, input) as AlpaGasus shows them. An Alpaca record's prompt is its instruction, a blank line and
    its input; for other records the first user turn is the instruction and the later user turns are the input."""
    prompt, instruction = text.prompt, text.instruction
    if instruction and prompt.startswith(instruction):
        return instruction, prompt[len(instruction) :].strip()
    return prompt, ""


def grading_messages(text: QualityText) -> tuple[dict[str, str], ...]:
    instruction, given_input = split_instruction(text)
    system = SYSTEM_PROMPT.format(instruction=instruction, input=given_input, response=text.answer)
    return ({"role": "system", "content": system}, {"role": "user", "content": USER_PROMPT})


def parse_score(reply: str) -> float | None:
    """The first number on the first non-empty line (AlpaGasus asks for the score alone there), else the number
    after "Score:" anywhere; None when neither is found or the number is outside [0, 5]."""
    lines = [line for line in reply.splitlines() if line.strip()]
    first = _NUMBER.search(lines[0]) if lines else None
    found = first.group(0) if first else None
    if found is None:
        labelled = _LABELLED.search(reply)
        found = labelled.group(1) if labelled else None
    if found is None:
        return None
    score = float(found)
    return score if 0 <= score <= MAX_SCORE else None


def score_texts(
    texts: Sequence[QualityText],
    cfg: ModelScoreConfig,
    cache_path: Path,
    *,
    endpoint: JudgeEndpoint | None = None,
) -> ScoreResult:
    """Scores every text through the judge (`endpoint` overrides `judge_endpoint(cfg)`, e.g. its retry timing);
    removes those scored below cfg.threshold. Nothing is asked when cfg.url is empty or there are no texts."""
    result = ScoreResult()
    if not cfg.url or not texts:
        return result
    messages = [grading_messages(text) for text in texts]
    distinct = list(dict.fromkeys(tuple(m["content"] for m in each) for each in messages))
    position = {contents: index for index, contents in enumerate(distinct)}
    requests = [
        JudgeRequest(({"role": "system", "content": system}, {"role": "user", "content": user}))
        for system, user in distinct
    ]
    with JudgeClient(endpoint or judge_endpoint(cfg), cache_path) as client:
        replies = client.ask_all(requests)
        counters = client.counters
    result.counters = ScoreCounters(
        calls=counters.requests, cache_hits=counters.cache_hits, retries=counters.retries
    )
    for text, each in zip(texts, messages, strict=True):
        reply = replies[position[tuple(m["content"] for m in each)]]
        if reply.text is None:
            result.counters.failed += 1
            result.unscored.append(text.ref)
            continue
        score = parse_score(reply.text)
        if score is None:
            result.counters.unparseable += 1
            result.unscored.append(text.ref)
            continue
        result.scores[text.ref] = score
        if score < cfg.threshold:
            result.removals.append(
                Removal(text.ref, "low_score", None, f"score {score:g} < {cfg.threshold:g}")
            )
    if result.unscored:
        logger.warning(
            "model score: %d record(s) kept unscored (%d failed calls, %d unparseable replies)",
            len(result.unscored),
            result.counters.failed,
            result.counters.unparseable,
        )
    return result
