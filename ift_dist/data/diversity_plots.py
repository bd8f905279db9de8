"""The diversity report dict (diversity.build_report) -> one self-contained HTML page, its charts drawn with
matplotlib (Agg) and embedded as base64 PNGs; no scripts, every text escaped."""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import warnings
from collections.abc import Sequence
from typing import Any

_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:80em}section{border-top:2px solid #ccc;margin-top:1.5em}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
    "td.n{text-align:right}img{max-width:100%}.note{color:#555;font-size:90%}"
)
LENGTH_TITLES = {
    "prompt_chars": "prompt characters",
    "answer_chars": "answer characters",
    "prompt_tokens": "prompt tokens",
    "answer_tokens": "answer tokens",
}


@functools.cache
def _font_chars() -> frozenset[int]:
    """The code points matplotlib's default font can draw (DejaVu Sans has no CJK)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap())


def _label(text: str, rank: int) -> str:
    """A chart label: the text, or "#rank" when the font cannot draw it (the table beside the chart names it)."""
    drawable = all(ord(ch) in _font_chars() for ch in text if not ch.isspace())
    return (text if len(text) <= 24 else text[:23] + "…") if drawable else f"#{rank}"


def _png(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return f'<img alt="chart" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display where reports are written; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def lengths_chart(lengths: dict[str, Any]) -> str:
    """One panel per length metric: a step histogram per source over the shared log-spaced bins."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.2), squeeze=False)
    for axis, (metric, histogram) in zip(axes[0], lengths.items(), strict=True):
        edges = histogram["edges"]
        for rank, (name, counts) in enumerate(histogram["groups"].items(), start=1):
            axis.stairs(counts, edges, label=_label(name, rank))
        axis.set_xscale("symlog", linthresh=1)
        axis.set_title(LENGTH_TITLES.get(metric, metric))
        axis.set_ylabel("records")
    axes[0][0].legend(fontsize=8)
    return _png(figure)


def rouge_chart(rouge: dict[str, Any]) -> str:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 3.2))
    axis.stairs(rouge["counts"], rouge["edges"], fill=True)
    axis.set_xlabel("ROUGE-L F1 with the most similar other instruction")
    axis.set_ylabel("instructions")
    return _png(figure)


def bar_chart(items: Sequence[tuple[str, float]], title: str, xlabel: str = "records") -> str:
    """Horizontal bars, largest on top."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 1.4 + 0.22 * len(items)))
    labels = [_label(name, rank) for rank, (name, _) in enumerate(items, start=1)]
    axis.barh(labels[::-1], [value for _, value in items][::-1])
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.tick_params(axis="y", labelsize=8)
    return _png(figure)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        shown = f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))
        return f'<td class="n">{html.escape(shown)}</td>' if numeric else f"<td>{html.escape(shown)}</td>"

    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(cell(value) for value in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _group_section(by: str, table: dict[str, Any], metrics: Sequence[str]) -> str:
    header = ["#", by, "records", "share", *(f"{m} median" for m in metrics), "distinct-1", "distinct-2"]
    header += ["ROUGE-L NN (sampled)", "sampled"]
    rows = [
        [
            rank,
            name if name != "(other)" else f"(other: {row.get('groups', 0)} groups)",
            row["records"],
            row["share"],
            *(row[m]["median"] for m in metrics),
            row["distinct_1"],
            row["distinct_2"],
            row["rouge_l_nn"],
            row["sampled"],
        ]
        for rank, (name, row) in enumerate(table.items(), start=1)
    ]
    listed = [
        (name, row["records"]) for name, row in table.items() if name != "(other)"
    ]  # the rest, in the table
    chart = bar_chart(listed, f"records by {by} (largest groups)")
    return f'<section id="by-{html.escape(by)}"><h2>By {html.escape(by)}</h2>{chart}{_table(header, rows)}</section>'


def _words_section(words: dict[str, list]) -> str:
    titles = {  # key: (chart title, section heading)
        "verbs": ("verbs", "top verbs, finite or infinitive (part-of-speech tagger)"),
        "nouns": ("nouns", "top nouns (part-of-speech tagger)"),
        "verb_noun": ("first verb + noun", "top first verb + the noun after it (part-of-speech tagger)"),
        "first_words": ("first words", "top first words (request phrases skipped; not tagged as verbs)"),
        "content_words": ("content words", "top content words (stop words removed; not tagged as nouns)"),
    }
    parts = [
        '<section id="words"><h2>Instruction words</h2>',
        f'<p class="note">English instructions of {words["records"]} records (seeded sample).</p>',
    ]
    for key, (short, title) in titles.items():
        if words.get(key):
            items = [(word, count) for word, count in words[key]]
            ranked = [[rank, word, count] for rank, (word, count) in enumerate(items, start=1)]
            parts += [f"<h3>{html.escape(title)}</h3>", bar_chart(items, short, "instructions")]
            parts.append(_table(["#", "word", "count"], ranked))
    return "".join(parts) + "</section>"


def _languages_section(languages: dict[str, Any]) -> str:
    overall = languages["overall"]
    rows = [
        [source, *(counts.get(lang, 0) for lang in overall)]
        for source, counts in languages["by_source"].items()
    ]
    chart = bar_chart(list(overall.items()), "languages (langdetect, sampled)") if overall else ""
    return (
        f'<section id="languages"><h2>Languages</h2><p class="note">langdetect on {languages["sample"]} sampled '
        f"records (prompt and answer), seeded.</p>{chart}{_table(['source', *overall], rows)}</section>"
    )


def _clusters_section(clusters: dict[str, Any]) -> str:
    rows = [[item["size"], ", ".join(item["refs"]), item["instruction"]] for item in clusters["largest"]]
    sizes = ", ".join(f"{size}: {n}" for size, n in clusters["size_counts"].items()) or "none"
    return (
        f'<section id="clusters"><h2>Near-duplicate clusters</h2><p>{clusters["count"]} clusters holding '
        f"{clusters['records']} records (cluster size: clusters = {html.escape(sizes)})</p>"
        f"{_table(['size', 'first refs', 'instruction'], rows)}</section>"
    )


def _removed_section(removed: dict[str, Any]) -> str:
    reasons = list(removed["by_reason"])
    rows = [[source, *(counts.get(r, 0) for r in reasons)] for source, counts in removed["by_source"].items()]
    examples = [
        [reason, item["ref"], item["matched"], item["detail"]]
        for reason, items in removed["examples"].items()
        for item in items
    ]
    chart = bar_chart(list(removed["by_reason"].items()), "records removed, by reason") if reasons else ""
    return (
        f'<section id="removed"><h2>Removed records</h2><p>{removed["total"]} records removed by data.quality</p>'
        f"{chart}{_table(['source', *reasons], rows)}<h3>Examples</h3>"
        f"{_table(['reason', 'record', 'matched', 'detail'], examples)}</section>"
    )


def render_html(report: dict[str, Any], title: str = "ift data report") -> str:
    """The whole page: summary, one section per grouping, lengths, ROUGE-L, words, languages, clusters, removals,
    and the report's JSON at the end (folded)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # CJK labels are "#rank"
        return _render(report, title)


def _render(report: dict[str, Any], title: str) -> str:
    tools = report["tools"]
    rouge = report["rouge_l"]
    metrics = list(report["lengths"])
    summary = _table(
        ["records", "sample", "seed", "rouge-score", "langdetect", "part-of-speech tagger", "tokenizer"],
        [[report["records"], report["sample"], report["seed"], tools["rouge_score"], tools["langdetect"],
          tools["pos_tagger"] or "none installed: first words and content words instead", tools["tokenizer"]]],
    )  # fmt: skip
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        f'<section id="summary"><h2>Summary</h2>{summary}</section>',
        *(_group_section(by, table, metrics) for by, table in report["groupings"].items()),
        f'<section id="lengths"><h2>Lengths</h2>{lengths_chart(report["lengths"])}</section>',
        '<section id="rouge"><h2>Instruction similarity (ROUGE-L)</h2>',
        f'<p class="note">Each of {rouge["sample"]} sampled instructions against its most similar other sampled '
        f"instruction (first {rouge['max_tokens']} tokens; CJK characters are tokens). Mean {rouge['mean_nn']}, "
        f"median {rouge['median_nn']}, {rouge['above_0.7']} above 0.7.</p>",
        (rouge_chart(rouge) if rouge["sample"] else "") + "</section>",
        _words_section(report["words"]),
        _languages_section(report["languages"]),
        _clusters_section(report["clusters"]),
        _removed_section(report["removed"]),
        "<section id='json'><h2>Data</h2><details><summary>the report as JSON</summary><pre>",
        html.escape(json.dumps(report, indent=1, ensure_ascii=False)),
        "</pre></details></section></body></html>",
    ]
    return "".join(parts)
