"""The search of bench/train_throughput.py --search-micro-batch for each contender's largest micro batch (rows per
rank) that fits: doubling then bisecting over probe outcomes, each probe one run of bench/contender_run.py.

    best, probes = largest_fitting(probe, start=1, limit=64, tolerance=0.0)   # pure: probe(m) -> Outcome
    report = search(contenders, args, workdir, model, tokenizer, gpu, flops)  # the runs, search.json, the table
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contender_run import NAMES, Outcome, failure_cell, prepare, run_contender, summarize


def largest_fitting(
    probe: Callable[[int], Outcome], *, start: int = 1, limit: int = 64, tolerance: float = 0.0
) -> tuple[int | None, dict[int, Outcome]]:
    """The largest micro batch m in [1, limit] with probe(m).fits, assuming that what fits at m fits at every smaller
    m: from `start`, double while it fits (up to `limit`), or halve while it does not (down to 1), then bisect
    between the largest that fits and the smallest that does not. `tolerance` > 0 stops the bisection once the
    smallest failure is within (1 + tolerance) x the largest fit (fewer probes; the answer is then a lower bound
    that close to the true one). Returns (that m or None when even 1 does not fit, every probe's outcome by m);
    each m is probed at most once."""
    if not 1 <= start <= limit:
        raise ValueError(f"need 1 <= start ({start}) <= limit ({limit})")
    probes: dict[int, Outcome] = {}

    def fits(micro_batch: int) -> bool:
        if micro_batch not in probes:
            probes[micro_batch] = probe(micro_batch)
        return probes[micro_batch].fits

    fit, fail = None, None
    if fits(start):
        fit = start
        while fit < limit:
            candidate = min(2 * fit, limit)
            if not fits(candidate):
                fail = candidate
                break
            fit = candidate
    else:
        fail = start
        while fail > 1:
            candidate = fail // 2
            if fits(candidate):
                fit = candidate
                break
            fail = candidate
    if fit is None:
        return None, probes
    while fail is not None and fail - fit > 1 and fail > fit * (1 + tolerance):
        middle = (fit + fail) // 2
        if fits(middle):
            fit = middle
        else:
            fail = middle
    return fit, probes


def search_starts(text: str, contenders: list[str]) -> dict[str, int]:
    """--search-start: one number for every contender, or NAME=N pairs (the others start at 1)."""
    if "=" not in text:
        return dict.fromkeys(contenders, int(text))
    starts = dict.fromkeys(contenders, 1)
    for pair in text.split(","):
        name, value = pair.split("=")
        if name.strip() not in starts:
            raise SystemExit(f"--search-start names {name.strip()!r}, not one of the contenders {contenders}")
        starts[name.strip()] = int(value)
    return starts


def search(
    contenders: list[str], args: argparse.Namespace, workdir: Path, model: Path, tokenizer: Any, gpu: bool,
    flops: Any,
) -> dict[str, Any]:  # fmt: skip
    """--search-micro-batch: each contender's largest micro batch (rows per rank) that fits, by doubling then
    bisecting (micro_batch_search.largest_fitting), each probe a run of --steps steps; prints one line per probe as
    it ends and the table at the end, and writes search.json."""
    geometries: dict[int, list[dict]] = {}  # micro batch -> its steps, prepared once for every contender
    report: dict[str, Any] = {}
    starts = search_starts(args.search_start, contenders)
    deadline = time.perf_counter() + args.search_deadline_s if args.search_deadline_s else None

    class DeadlineReached(Exception):
        """--search-deadline-s passed: no further probe starts."""

    def probe_in(contender: str) -> Any:
        def probe(micro_batch: int) -> Outcome:
            if deadline is not None and time.perf_counter() > deadline:
                raise DeadlineReached
            geometry = argparse.Namespace(**{**vars(args), "micro_batch_rows": micro_batch})
            directory = workdir / f"micro{micro_batch}"
            if micro_batch not in geometries:
                geometries[micro_batch] = prepare(geometry, model, tokenizer, directory, gpu)
            steps = geometries[micro_batch]
            started = time.perf_counter()
            result = run_contender(contender, geometry, directory, steps, directory / f"{contender}.log")
            numbers = summarize([result], steps, geometry, flops)
            report[contender]["probes"][micro_batch] = {**result, "summary": numbers}
            shown = f"{numbers['tokens_per_second']:,.0f} tokens/s, {numbers['peak_memory_gb']:.1f} GiB" if numbers \
                else failure_cell([result])  # fmt: skip
            print(f"# probe {contender} micro batch {micro_batch}: {shown} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
            (workdir / "search.json").write_text(json.dumps(report, indent=1, default=str))
            return Outcome(result["status"], result.get("detail", ""))

        return probe

    for contender in contenders:
        report[contender] = {"probes": {}}
        try:
            best, _ = largest_fitting(
                probe_in(contender), start=min(starts[contender], args.search_max), limit=args.search_max,
                tolerance=args.search_tolerance,
            )  # fmt: skip
        except DeadlineReached:  # the largest that fitted so far: a lower bound
            fitted = [
                int(micro) for micro, probe in report[contender]["probes"].items() if probe["status"] == "ok"
            ]
            best = max(fitted, default=None)
            report[contender]["stopped"] = "deadline"
        report[contender]["largest"] = best
    (workdir / "search.json").write_text(json.dumps(report, indent=1, default=str))
    print_search_table(report, args)
    return report


def print_search_table(report: dict[str, Any], args: argparse.Namespace) -> None:
    """One row per contender: the largest micro batch that fits, its numbers, and the fastest micro batch probed."""
    print(
        f"| contender | largest micro batch (rows/rank, x{args.accumulation} accumulation) | tokens/s | "
        "peak memory / rank GiB | MFU | fastest probe: tokens/s (micro batch) | probes |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for contender, found in report.items():
        probes = {int(micro): probe for micro, probe in found["probes"].items()}
        shown = ", ".join(
            f"{micro} {'ok' if probe['summary'] else failure_cell([probe])}"
            for micro, probe in sorted(probes.items())
        )
        largest = found.get("largest")
        if found.get("stopped"):
            stopped = (
                f"search stopped at --search-deadline-s{', largest is a lower bound' if largest else ''}"
            )
            shown = f"{shown}; {stopped}" if shown else stopped
        if largest is None:
            print(f"| {NAMES[contender]} | {'not found' if found.get('stopped') else 'none fits'} | - | - | - | - "
                  f"| {shown or 'not probed'} |")  # fmt: skip
            continue
        numbers = probes[largest]["summary"]
        fastest = max(
            (micro for micro, probe in probes.items() if probe["summary"]),
            key=lambda micro: probes[micro]["summary"]["tokens_per_second"],
        )
        mfu = f"{100 * numbers['mfu']:.1f}%" if numbers["mfu"] is not None else "n/a"
        print(
            f"| {NAMES[contender]} | {largest} | {numbers['tokens_per_second']:,.0f} | "
            f"{numbers['peak_memory_gb']:.2f} | {mfu} | "
            f"{probes[fastest]['summary']['tokens_per_second']:,.0f} ({fastest}) | {shown} |"
        )
