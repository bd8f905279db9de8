"""Human-readable views of the data: a rendered sample with its supervised part marked (terminal and HTML), and
the text form of a data report."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

from ift_dist.data.types import IGNORE_INDEX, RenderedSample

_GREEN = "\x1b[1;32m"
_RESET = "\x1b[0m"


def supervised_runs(sample: RenderedSample) -> list[tuple[bool, list[int]]]:
    """Consecutive runs of (supervised?, token ids), in order."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        supervised = label != IGNORE_INDEX
        if runs and runs[-1][0] == supervised:
            runs[-1][1].append(token)
        else:
            runs.append((supervised, [token]))
    return runs


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def format_sample(sample: RenderedSample, tokenizer: Any, *, color: bool = True) -> str:
    """The sample's text; supervised text in bold green (or between [[ and ]] without color)."""
    parts = []
    for supervised, ids in supervised_runs(sample):
        text = _decode(tokenizer, ids)
        if supervised:
            text = f"{_GREEN}{text}{_RESET}" if color else f"[[{text}]]"
        parts.append(text)
    supervised_count = sum(label != IGNORE_INDEX for label in sample.labels)
    header = f"--- {sample.ref}  ({len(sample)} tokens, {supervised_count} supervised"
    if sample.dropped_turns:
        header += f", {sample.dropped_turns} trailing turns dropped"
    if sample.truncated:
        header += ", truncated"
    return header + ")\n" + "".join(parts)


def samples_html(
    samples: Iterable[RenderedSample], tokenizer: Any, *, title: str = "ift-dist preview"
) -> str:
    """A self-contained HTML page: one block per sample, supervised tokens highlighted, token boundaries visible on
    hover (each token is a span with its id as a tooltip)."""
    blocks = []
    for sample in samples:
        spans = []
        for token, label in zip(sample.input_ids, sample.labels, strict=True):
            css = "sup" if label != IGNORE_INDEX else "ctx"
            text = html.escape(_decode(tokenizer, [token]))
            spans.append(f'<span class="{css}" title="{token}">{text}</span>')
        supervised_count = sum(label != IGNORE_INDEX for label in sample.labels)
        blocks.append(
            f"<h2>{html.escape(str(sample.ref))} &middot; {len(sample)} tokens &middot; {supervised_count} supervised"
            f"</h2>\n<pre>{''.join(spans)}</pre>"
        )
    style = (
        "body{font-family:sans-serif;margin:2em}pre{white-space:pre-wrap;background:#f7f7f7;padding:1em;"
        "border:1px solid #ddd}.sup{background:#c8f7c5}.ctx{color:#555}span:hover{outline:1px solid #999}"
    )
    legend = '<p>Highlighted: <span class="sup">supervised (carries loss)</span>; grey: context only.</p>'
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{legend}\n"
        + "\n".join(blocks)
        + "\n</body></html>\n"
    )


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """The text form of `DataReport.to_dict()`."""
    out = []
    sources = report["sources"]
    out.append("Sources")
    out.append(
        _table(
            [
                [
                    s["name"],
                    s["format"],
                    s["records"],
                    s["valid"],
                    s["bad"],
                    s["filtered"],
                    s["weight"],
                    s["planned"],
                ]
                for s in sources
            ],
            ["name", "format", "records", "valid", "bad", "filtered", "weight", "per epoch"],
        )
    )
    bad = report["bad_records_by_reason"]
    out.append(
        "\nBad records by reason: " + (", ".join(f"{k} {v}" for k, v in sorted(bad.items())) or "none")
    )
    for line in report.get("bad_record_examples", [])[:10]:
        out.append(f"  {line}")
    samples = report["samples"]
    out.append(
        f"\nSamples: {samples['rendered']} rendered, {samples['dropped']} dropped "
        f"({', '.join(f'{k} {v}' for k, v in sorted(samples['dropped_by_reason'].items())) or 'none'}), "
        f"{samples['truncated']} truncated, {samples['dropped_turns']} trailing turns dropped in "
        f"{samples['with_dropped_turns']} samples"
    )
    turns = report["turns"]
    out.append(
        "Turns (messages per conversation): "
        + ", ".join(
            f"{k}: {v}" for k, v in sorted(turns["messages_histogram"].items(), key=lambda kv: int(kv[0]))
        )
    )
    out.append(f"Assistant turns per conversation: mean {turns['assistant_turns_mean']:.2f}")
    lengths = report["lengths"]
    out.append(
        "Token lengths: "
        + ", ".join(f"{k} {lengths[k]}" for k in ("min", "p50", "p90", "p99", "max"))
        + f", mean {lengths['mean']:.1f}"
    )
    histogram = lengths["histogram"]
    peak = max(histogram["counts"]) if histogram["counts"] else 1
    for low, high, count in zip(
        histogram["edges"][:-1], histogram["edges"][1:], histogram["counts"], strict=True
    ):
        bar = "#" * max(1 if count else 0, round(40 * count / peak))
        out.append(f"  {low:>6}-{high:<6} {count:>7}  {bar}")
    tokens = report["tokens"]
    out.append(
        f"Tokens: {tokens['total']} total, {tokens['supervised']} supervised "
        f"({100 * tokens['supervised_ratio']:.1f}%)"
    )
    packing = report["packing"]
    if packing["enabled"]:
        out.append(
            f"Packing: {packing['rows']} rows of {packing['max_length']} tokens, efficiency "
            f"{100 * packing['efficiency']:.2f}% (buffer {packing['buffer']} samples), "
            f"{packing['samples_per_row']:.2f} samples per row"
        )
    else:
        out.append(f"Packing: off; padded rows, efficiency {100 * packing['efficiency']:.2f}%")
    return "\n".join(out)
