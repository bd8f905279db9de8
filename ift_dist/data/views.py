"""Human-readable views of the data: a rendered sample with its supervised part marked (terminal and HTML), and
the text forms of a data report and of its dropped samples."""

from __future__ import annotations

import html
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from ift_dist.data.contracts import IGNORE_INDEX, RenderedSample

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


_ELIDED = " [...] "


def _cut(text: str, chars: int, newlines: int) -> str:
    """The start of `text` with at most `chars` characters and `newlines` newlines (a cut at a line end leaves that
    newline out)."""
    kept = text[:chars]
    position = -1
    for _ in range(newlines + 1):
        position = kept.find("\n", position + 1)
        if position < 0:
            return kept
    return kept[:position]


def _glance(
    runs: list[tuple[bool, str]], max_chars: int, max_lines: int
) -> tuple[list[tuple[bool, str]], int]:
    """The runs cut to about `max_chars` characters and `max_lines` lines, and how many characters were left out.
    When the whole does not fit, a long context run keeps its start and its end (a third of each budget each), so
    that the supervised text after a long prompt is still seen; then everything past the budgets is cut."""
    whole = "".join(text for _, text in runs)
    if len(whole) <= max_chars and whole.count("\n") < max_lines:
        return runs, 0
    share_chars, share_newlines = max(max_chars // 3, 1), max_lines // 3
    shortened = []
    for supervised, text in runs:
        if not supervised and (len(text) > 2 * share_chars or text.count("\n") > 2 * share_newlines):
            head = _cut(text, share_chars, share_newlines)
            tail = _cut(text[::-1], share_chars, share_newlines)[::-1]
            text = head + _ELIDED + tail
        shortened.append((supervised, text))
    chars_left, newlines_left = max_chars, max_lines - 1
    kept = []
    for supervised, text in shortened:
        shown = _cut(text, max(chars_left, 0), max(newlines_left, 0))
        chars_left -= len(shown)
        newlines_left -= shown.count("\n")
        kept.append((supervised, shown))
        if shown != text:
            break
    shown = "".join(text for _, text in kept)
    return kept, len(whole) - len(shown) + shown.count(_ELIDED) * len(_ELIDED)


def format_sample(
    sample: RenderedSample,
    tokenizer: Any,
    *,
    color: bool = True,
    max_chars: int | None = None,
    max_lines: int | None = None,
) -> str:
    """The sample's text; supervised text in bold green (or between [[ and ]] without color). With `max_chars` or
    `max_lines`, a glance: about that many characters or lines (a long prompt keeps its start and end around
    " [...] "), then a line saying how many characters are left out. The marks are not counted and always closed."""
    runs = [(supervised, _decode(tokenizer, ids)) for supervised, ids in supervised_runs(sample)]
    left_out = 0
    if max_chars is not None or max_lines is not None:
        runs, left_out = _glance(runs, max_chars or sys.maxsize, max_lines or sys.maxsize)
    parts = []
    for supervised, text in runs:
        if supervised and text:
            text = f"{_GREEN}{text}{_RESET}" if color else f"[[{text}]]"
        parts.append(text)
    supervised_count = sum(label != IGNORE_INDEX for label in sample.labels)
    header = f"--- {sample.ref}  ({len(sample)} tokens, {supervised_count} supervised"
    if sample.dropped_turns:
        header += f", {sample.dropped_turns} trailing turns dropped"
    if sample.truncated:
        header += ", truncated"
    tail = f"\n... ({left_out} more characters)" if left_out else ""
    return header + ")\n" + "".join(parts) + tail


def removals_html(removed: Sequence[tuple[dict[str, Any], str]]) -> str:
    """The records data.quality removed, as an HTML section: per record its ref, the reason, what it matched, the
    numbers behind the decision, and its text (the answer to "why was this dropped?")."""
    if not removed:
        return ""
    rows = []
    for removal, text in removed:
        matched = f" &middot; matches {html.escape(removal['matched'])}" if removal["matched"] else ""
        detail = f" &middot; {html.escape(removal['detail'])}" if removal["detail"] else ""
        rows.append(
            f"<h3>{html.escape(removal['ref'])} &middot; <b>{html.escape(removal['reason'])}</b>{matched}{detail}"
            f"</h3>\n<pre class='ctx'>{html.escape(text)}</pre>"
        )
    return "<h2>Removed by data.quality, and why</h2>\n" + "\n".join(rows)


def samples_html(
    samples: Iterable[RenderedSample], tokenizer: Any, *, title: str = "ift-dist preview", extra: str = ""
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
        + (f"\n{extra}" if extra else "")
        + "\n</body></html>\n"
    )


def format_drops(drops: Sequence[dict[str, Any]], max_listed: int) -> list[str]:
    """The lines that name dropped samples (`analyze()["dropped_samples"]`), grouped by reason, at most `max_listed`
    per reason, then how many more."""
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for drop in drops:
        by_reason.setdefault(drop["reason"], []).append(drop)
    lines = []
    for reason, entries in sorted(by_reason.items()):
        lines.append(f"  {reason}: {len(entries)} record{'s' if len(entries) != 1 else ''}")
        for drop in entries[:max_listed]:
            times = f" (x{drop['times']} per epoch)" if drop["times"] > 1 else ""
            lines.append(f"    {drop['ref']} ({drop['where']}){times}: {drop['detail']}")
        if len(entries) > max_listed:
            lines.append(f"    ... and {len(entries) - max_listed} more (--json lists every one)")
    return lines


# A record, a sample and a row are counted separately; the report says which is which.
TERMS = (
    "A record is one line or item of a source file; a sample is one rendered conversation (or one assistant turn "
    "of it, data.multi_turn_mode, or one data.max_length chunk of a text document), after weighting "
    "(repeats) and drops; a row is one packed sequence of up to data.max_length tokens."
)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_quality(quality: dict[str, Any] | None, max_listed: int = 3) -> list[str]:
    """data.quality's removals by reason, with the first few of each: which record, and what it matched."""
    if not quality or not quality["removed"]:
        return []
    lines = [
        "\nRemoved by data.quality: "
        + ", ".join(f"{reason} {count}" for reason, count in quality["by_reason"].items())
    ]
    for reason in quality["by_reason"]:
        listed = [r for r in quality["removals"] if r["reason"] == reason][:max_listed]
        for removal in listed:
            matched = f" (matches {removal['matched']})" if removal["matched"] else ""
            detail = f": {removal['detail']}" if removal["detail"] else ""
            lines.append(f"  {reason} {removal['ref']}{matched}{detail}")
    return lines


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
                    s.get("tokens", "-"),
                    s.get("supervised_tokens", "-"),
                ]
                for s in sources
            ],
            [
                "name",
                "format",
                "records",
                "valid",
                "bad",
                "filtered",
                "weight",
                "per epoch",
                "tokens",
                "supervised",
            ],
        )
    )
    bad = report["bad_records_by_reason"]
    out.append(
        "\nBad records by reason: " + (", ".join(f"{k} {v}" for k, v in sorted(bad.items())) or "none")
    )
    for line in report.get("bad_record_examples", [])[:10]:
        out.append(f"  {line}")
    out.extend(format_quality(report.get("quality")))
    samples = report["samples"]
    out.append("\n" + TERMS)
    out.append(
        f"Samples: {samples['rendered']} rendered, {samples['dropped']} dropped "
        f"({', '.join(f'{k} {v}' for k, v in sorted(samples['dropped_by_reason'].items())) or 'none'}), "
        f"{samples['truncated']} truncated, {samples['dropped_turns']} trailing turns dropped in "
        f"{samples['with_dropped_turns']} samples"
    )
    if samples.get("per_turn_conversations"):
        out.append(
            f"Per-turn samples (data.multi_turn_mode): {samples['per_turn_conversations']} conversations became "
            f"{samples['per_turn_samples']} samples, one per assistant turn"
        )
    if samples.get("text_documents"):
        out.append(
            f"Raw text (format text): {samples['text_documents']} documents became {samples['text_chunks']} "
            "samples of at most data.max_length tokens, every token supervised"
        )
    out.extend(format_drops(report.get("dropped_samples", []), max_listed=3))
    turns = report["turns"]
    if turns["messages_histogram"]:  # none when every source is raw text
        histogram = sorted(turns["messages_histogram"].items(), key=lambda kv: int(kv[0]))
        out.append("Turns (messages per conversation): " + ", ".join(f"{k}: {v}" for k, v in histogram))
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
