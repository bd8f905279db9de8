"""`ift eval judge`: grade answers.jsonl files with an LLM judge (MT-bench single ratings or pairwise verdicts).

    ift eval judge --answers A.jsonl [B.jsonl ...] [--labels before after] --judge-url URL --judge-model M
    ift eval judge --mode pairwise --answers A.jsonl --baseline BASE.jsonl --judge-url URL --judge-model M

Single: each judged turn rated 1-10, a category scores its mean rating. Pairwise: each comparison asked in both
orders, a verdict counted only when the two agree (else a tie); win rate = (wins + ties/2) / comparisons, with a
bootstrap confidence interval. An unreadable verdict is counted as unparseable, never defaulted, and left out of
the scores. Writes judgments.jsonl, judge_results.json, judge_chart.png to --out; prints a Markdown table.
Exit codes: 0 done, 1 failed judge calls or unreadable answers (a rerun resumes from the cache), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from ift_dist import exit_codes
from ift_dist.eval.judge_prompts import (
    MAX_JUDGED_TURNS,
    REFERENCE_CATEGORIES,
    AnswerRecord,
    JudgePrompt,
    majority,
    pairwise_prompt,
    parse_rating,
    parse_verdict,
    read_answers,
    single_prompt,
    swap_outcome,
)

logger = logging.getLogger(__name__)

NO_CATEGORY = "(none)"  # the category column of records without one


class JudgeMode(str, Enum):
    single = "single"
    pairwise = "pairwise"


@dataclass(frozen=True)
class JudgeSettings:
    """How the judgments are asked and summarised (the endpoint aside)."""

    mode: JudgeMode
    repeats: int = 1  # each prompt asked this many times; single: median rating, pairwise: majority verdict
    reference_categories: tuple[str, ...] = REFERENCE_CATEGORIES  # graded against the set's reference answers
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    seed: int = 1234  # of the bootstrap: the same judgments give the same interval


# --- flows: prompts out, judgments back ---------------------------------------------------------------------
def judged_turns(record: AnswerRecord) -> range:
    return range(1, min(MAX_JUDGED_TURNS, len(record.turns)) + 1)


def _ask(client: Any, prompts: list[JudgePrompt], repeats: int) -> list[list[Any]]:
    """The replies to every prompt, repeats each, all in one pool so that the concurrency limit is shared."""
    from ift_dist.eval.judge_client import JudgeRequest

    requests = [JudgeRequest(p.messages, repeat) for p in prompts for repeat in range(repeats)]
    replies = client.ask_all(requests)
    return [replies[i : i + repeats] for i in range(0, len(replies), repeats)]


def _replies_fields(replies: list[Any], parse: Callable[[str], Any], name: str) -> dict[str, Any]:
    """The parsed values (None: unparseable or failed), the status, texts and errors of one prompt's repeats."""
    values = [parse(r.text) if r.text is not None else None for r in replies]
    status = "ok" if any(v is not None for v in values) else "unparseable"
    status = "call_failed" if any(r.text is None for r in replies) else status
    unparseable = sum(r.text is not None and v is None for r, v in zip(replies, values, strict=True))
    texts, errors = [r.text for r in replies], [r.error for r in replies if r.error]
    return {name: values, "status": status, "unparseable_replies": unparseable, "judge_texts": texts,
            "errors": errors}  # fmt: skip


def _item_fields(record: AnswerRecord, turn: int, label: str, mode: JudgeMode, template: str) -> dict:
    return {"label": label, "id": record.id, "sample": record.sample, "category": record.category,
            "turn": turn, "mode": mode.value, "template": template}  # fmt: skip


def judge_single(
    client: Any, records: list[AnswerRecord], label: str, settings: JudgeSettings
) -> list[dict[str, Any]]:
    """One judgment per (record, judged turn): the median of the parsed ratings of its repeats."""
    items = [(record, turn) for record in records for turn in judged_turns(record)]
    prompts = [single_prompt(record, turn, settings.reference_categories) for record, turn in items]
    judgments = []
    replies = _ask(client, prompts, settings.repeats)
    for (record, turn), prompt, prompt_replies in zip(items, prompts, replies, strict=True):
        fields = _replies_fields(prompt_replies, parse_rating, "ratings")
        parsed = [rating for rating in fields["ratings"] if rating is not None]
        item = _item_fields(record, turn, label, JudgeMode.single, prompt.template)
        judgments.append({**item, "rating": statistics.median(parsed) if parsed else None, **fields})
    return judgments


def judge_pairwise(
    client: Any,
    records: list[AnswerRecord],
    baseline: list[AnswerRecord],
    label: str,
    baseline_label: str,
    settings: JudgeSettings,
) -> list[dict[str, Any]]:
    """One judgment per (record, judged turn): both orders asked, the outcome counted only when they agree."""
    by_key = {record.key: record for record in baseline}
    missing = [record.id for record in records if record.key not in by_key]
    if missing:
        raise ValueError(f"{label}: {len(missing)} answers have no baseline answer, ids {missing[:10]}")
    items = [(record, by_key[record.key], turn) for record in records for turn in judged_turns(record)]
    prompts = []
    for record, base, turn in items:
        prompts.append(pairwise_prompt(record, base, turn, settings.reference_categories))  # model is A
        prompts.append(pairwise_prompt(base, record, turn, settings.reference_categories))  # model is B
    replies = _ask(client, prompts, settings.repeats)
    judgments = []
    for index, (record, _, turn) in enumerate(items):
        orders = []
        for order, (first, second) in enumerate(((label, baseline_label), (baseline_label, label))):
            fields = _replies_fields(replies[2 * index + order], parse_verdict, "verdicts")
            verdict = majority([v for v in fields["verdicts"] if v is not None])
            orders.append({"a": first, "b": second, "verdict": verdict, **fields})
        statuses = {order["status"] for order in orders}
        status = next((s for s in ("call_failed", "unparseable") if s in statuses), "ok")
        outcome, consistent = (None, None)
        if status == "ok":
            outcome, consistent = swap_outcome(orders[0]["verdict"], orders[1]["verdict"])
        judgments.append(
            {
                **_item_fields(record, turn, label, JudgeMode.pairwise, prompts[2 * index].template),
                "baseline": baseline_label,
                "outcome": outcome,
                "consistent": consistent,
                "status": status,
                "unparseable_replies": sum(order["unparseable_replies"] for order in orders),
                "orders": orders,
            }
        )
    return judgments


# --- scores --------------------------------------------------------------------------------------------------
OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def bootstrap_ci(
    values: Sequence[float], resamples: int, confidence: float, seed: int
) -> tuple[float, float] | None:
    """The percentile bootstrap interval of the mean of values (resampled with replacement); None when empty."""
    import numpy as np

    if not values:
        return None
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)  # [resamples]
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _score_group(judgments: list[dict[str, Any]], settings: JudgeSettings) -> dict[str, Any]:
    ok = [j for j in judgments if j["status"] == "ok"]
    counts = {
        "n": len(judgments),
        "scored": len(ok),
        "unparseable": sum(j["status"] == "unparseable" for j in judgments),
        "call_failed": sum(j["status"] == "call_failed" for j in judgments),
        "unparseable_replies": sum(j["unparseable_replies"] for j in judgments),
    }
    if settings.mode is JudgeMode.single:
        ratings = [j["rating"] for j in ok]
        return {"score": statistics.fmean(ratings) if ratings else None, **counts}
    scores = [OUTCOME_SCORE[j["outcome"]] for j in ok]
    ci = bootstrap_ci(scores, settings.bootstrap_resamples, settings.confidence, settings.seed)
    outcomes = Counter(j["outcome"] for j in ok)
    return {
        "score": statistics.fmean(scores) if scores else None,  # the win rate, ties counted 1/2
        "ci": list(ci) if ci else None,
        **{plural: outcomes[name] for name, plural in (("win", "wins"), ("tie", "ties"), ("loss", "losses"))},
        "inconsistent": sum(j["consistent"] is False for j in ok),
        **counts,
    }


def summarize(
    judgments: list[dict[str, Any]], labels: Sequence[str], settings: JudgeSettings
) -> dict[str, Any]:
    """Per label: the overall score, and the score by category and by turn."""
    summary = {}
    for label in labels:
        mine = [j for j in judgments if j["label"] == label]
        by_category, by_turn = defaultdict(list), defaultdict(list)
        for j in mine:
            by_category[j["category"] or NO_CATEGORY].append(j)
            by_turn[str(j["turn"])].append(j)
        summary[label] = {
            "overall": _score_group(mine, settings),
            "by_category": {cat: _score_group(group, settings) for cat, group in sorted(by_category.items())},
            "by_turn": {turn: _score_group(group, settings) for turn, group in sorted(by_turn.items())},
        }
    return summary


def markdown_table(summary: dict[str, Any], mode: JudgeMode) -> str:
    labels = list(summary)
    categories = sorted({cat for label in labels for cat in summary[label]["by_category"]})

    def cell(group: dict[str, Any] | None) -> str:
        if not group:
            return "-"
        if group["score"] is None:  # nothing could be scored: say why, never a silent blank
            return f"- (0 of {group['n']} scored: {group['unparseable']} unparseable, {group['call_failed']} failed)"
        text = f"{group['score']:.2f}" if mode is JudgeMode.single else f"{100 * group['score']:.1f}%"
        if group.get("ci"):
            text += f" [{100 * group['ci'][0]:.1f}, {100 * group['ci'][1]:.1f}]"
        missing = group["unparseable"] + group["call_failed"]
        return text + f" (n={group['scored']}" + (f", {missing} unscored)" if missing else ")")

    head = (
        "mean rating (1-10)" if mode is JudgeMode.single else "win rate vs baseline (ties 1/2), bootstrap CI"
    )
    rows = [[f"category ({head})", *labels], ["---"] * (len(labels) + 1)]
    rows += [[cat, *(cell(summary[label]["by_category"].get(cat)) for label in labels)] for cat in categories]
    rows.append(["**overall**", *(cell(summary[label]["overall"]) for label in labels)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def write_chart(summary: dict[str, Any], mode: JudgeMode, path: Path) -> None:
    """Bars per category, the labels side by side; pairwise bars carry their confidence interval."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters; must precede pyplot
    import matplotlib.pyplot as plt

    labels = list(summary)
    categories = [*sorted({cat for label in labels for cat in summary[label]["by_category"]}), "overall"]
    width = 0.8 / len(labels)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 * len(categories) * max(1, len(labels) / 2)), 4.5))
    for index, label in enumerate(labels):
        groups = [summary[label]["by_category"].get(cat) if cat != "overall" else summary[label]["overall"]
                  for cat in categories]  # fmt: skip
        heights = [g["score"] if g and g["score"] is not None else 0.0 for g in groups]
        errors = None
        if mode is JudgeMode.pairwise:
            # max(0, ...): matplotlib rejects a negative error, which float rounding can produce at the bounds.
            errors = [[max(0.0, h - g["ci"][0]) if g and g.get("ci") else 0.0 for h, g in zip(heights, groups)],
                      [max(0.0, g["ci"][1] - h) if g and g.get("ci") else 0.0 for h, g in zip(heights, groups)]]  # fmt: skip
        positions = [c + (index - (len(labels) - 1) / 2) * width for c in range(len(categories))]
        axes.bar(positions, heights, width, yerr=errors, capsize=3, label=label)
    axes.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    single = mode is JudgeMode.single
    axes.set_ylim(0, 10 if single else 1)
    axes.set_ylabel("mean judge rating (1-10)" if single else "win rate vs baseline (ties 1/2)")
    if not single:
        axes.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- the command -----------------------------------------------------------------------------------------------
def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ift eval judge`."""
    parser.add_argument(
        "--answers", nargs="+", required=True, type=Path, help="answers.jsonl file(s) or generate output dirs"
    )
    parser.add_argument("--labels", nargs="+", default=[], help="one per answers file (default: folder)")
    parser.add_argument("--mode", default=JudgeMode.single.value, choices=[m.value for m in JudgeMode])
    parser.add_argument("--baseline", type=Path, help="pairwise: answers.jsonl to compare with")
    parser.add_argument("--judge-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                        help="base URL of an OpenAI-compatible API (default: $OPENAI_BASE_URL, else OpenAI's)")  # fmt: skip
    parser.add_argument("--judge-model", required=True, help="the judge model's name on that server")
    parser.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the API key (unset: no key, for local servers)")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=2048, help="of each judge reply")
    parser.add_argument("--repeats", type=int, default=1, help="ask each prompt N times: median / majority")
    parser.add_argument("--concurrency", type=int, default=4, help="judge requests in flight at once")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request before a retry")
    parser.add_argument("--max-retries", type=int, default=6, help="per call, on 429, 5xx, timeouts")
    parser.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry, doubling")
    parser.add_argument("--reference-categories", nargs="*", default=list(REFERENCE_CATEGORIES),
                        help="categories graded against the set's reference answers, where it has them")  # fmt: skip
    parser.add_argument("--bootstrap", type=int, default=1000, help="pairwise: bootstrap resamples of the CI")
    parser.add_argument("--seed", type=int, default=1234, help="of the bootstrap")
    parser.add_argument(
        "--out", type=Path, help="results folder (default: judge_<mode>/ by the first answers)"
    )
    parser.add_argument("--cache", type=Path, help="reply cache (default: OUT/judge_cache.jsonl)")


def default_labels(paths: Sequence[Path]) -> list[str]:
    """The folder name of an answers.jsonl (the stem of any other file name), made unique."""
    labels: list[str] = []
    for path in paths:
        if path.is_dir():  # an `ift eval generate` output directory
            name = path.name
        else:
            name = path.parent.name if path.name == "answers.jsonl" and path.parent.name else path.stem
        labels.append(name if name not in labels else f"{name}-{len(labels)}")
    return labels


def run_judge(args: argparse.Namespace) -> int:
    """`ift eval judge`: the exit code (see the module docstring)."""
    from ift_dist.eval.judge_client import JudgeClient, endpoint_from_args

    mode = JudgeMode(args.mode)
    labels = list(args.labels) or default_labels(args.answers)
    problems = []
    if len(labels) != len(args.answers) or len(set(labels)) != len(labels):
        problems.append(f"--labels: {len(args.answers)} distinct names needed, got {labels}")
    if mode is JudgeMode.pairwise and args.baseline is None:
        problems.append("--mode pairwise needs --baseline")
    if min(args.repeats, args.concurrency, args.bootstrap) < 1 or args.max_retries < 0:
        problems.append("--repeats, --concurrency and --bootstrap must be >= 1, --max-retries >= 0")
    if problems:
        logger.error("ift eval judge: %s", "; ".join(problems))
        return exit_codes.CONFIG_ERROR
    out = args.out or args.answers[0].parent / f"judge_{mode.value}"
    endpoint = endpoint_from_args(
        args, url=args.judge_url, model=args.judge_model, key_env=args.judge_key_env
    )
    settings = JudgeSettings(
        mode, args.repeats, tuple(args.reference_categories), args.bootstrap, seed=args.seed
    )
    try:
        answers = {label: read_answers(path) for label, path in zip(labels, args.answers, strict=True)}
        baseline = read_answers(args.baseline) if mode is JudgeMode.pairwise else None
    except (OSError, ValueError, KeyError) as exc:
        logger.error("ift eval judge: cannot read the answers: %s", exc)
        return exit_codes.FAILED
    out.mkdir(parents=True, exist_ok=True)
    with JudgeClient(endpoint, args.cache or out / "judge_cache.jsonl") as client:
        try:
            results = judge_answers(client, settings, answers, baseline, out)
        except ValueError as exc:  # a baseline that does not cover the answers
            logger.error("ift eval judge: %s", exc)
            return exit_codes.FAILED
    results["answers"] = {label: str(path) for label, path in zip(labels, args.answers, strict=True)}
    results["baseline"] = str(args.baseline) if args.baseline else None
    results["judge"] = {**asdict(endpoint), "api_key": None}  # never written to disk
    (out / "judge_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(markdown_table(results["scores"], mode))
    print(f"\njudge calls: {results['counters']}\nresults in {out}")
    counters = results["counters"]
    if counters["failed"]:
        logger.error("%d judge calls failed for good; the same command retries them", counters["failed"])
        return exit_codes.FAILED
    return exit_codes.OK


def judge_answers(
    client: Any,
    settings: JudgeSettings,
    answers: dict[str, list[AnswerRecord]],
    baseline: list[AnswerRecord] | None,
    out: Path,
    baseline_label: str = "baseline",
) -> dict[str, Any]:
    """Judge every answers file, write judgments.jsonl and judge_chart.png to out; the results as a dict."""
    judgments: list[dict[str, Any]] = []
    for label, records in answers.items():
        not_judged = sum(max(0, len(r.turns) - MAX_JUDGED_TURNS) for r in records)
        if not_judged:
            logger.warning("%s: %d turns after turn %d not judged", label, not_judged, MAX_JUDGED_TURNS)
        if settings.mode is JudgeMode.single:
            judgments += judge_single(client, records, label, settings)
        else:
            assert baseline is not None
            judgments += judge_pairwise(client, records, baseline, label, baseline_label, settings)
    with (out / "judgments.jsonl").open("w", encoding="utf-8") as file:
        file.writelines(json.dumps(j, ensure_ascii=False) + "\n" for j in judgments)
    summary = summarize(judgments, list(answers), settings)
    write_chart(summary, settings.mode, out / "judge_chart.png")
    return {
        "mode": settings.mode.value,
        "settings": {**asdict(settings), "mode": settings.mode.value},
        "scores": summary,
        "counters": asdict(client.counters),
        "cache": {"path": str(client.cache.path), "entries": len(client.cache)},
    }
