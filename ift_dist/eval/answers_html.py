"""answers.jsonl records -> one self-contained HTML page to read the answers (no scripts, every text escaped).

Per (prompt, sample): id, category, the system prompt, then per turn the user's turn, the model's answer with how it
ended (stop / length: cut by max_new_tokens, highlighted) and its token counts, and the reference where the set has
one. The generation settings (generation.json) head the page, the chat template folded away.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:70em}pre{white-space:pre-wrap;background:#f7f7f7;"
    "padding:.6em;border:1px solid #ddd;margin:.2em 0 .8em}.user{border-left:4px solid #4a7bd0}"
    ".answer{border-left:4px solid #3a3}.reference{border-left:4px solid #c90;background:#fffaf0}"
    ".system{border-left:4px solid #888}.length{color:#b00;font-weight:bold}.label{color:#555;font-size:90%}"
    "section{border-top:2px solid #ccc;padding-top:.5em;margin-top:1.5em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
)


def _pre(css: str, text: str) -> str:
    return f'<pre class="{css}">{html.escape(text)}</pre>'


def _record_html(record: dict[str, Any]) -> str:
    title = [str(record.get("id")), str(record.get("category") or "")]
    if record.get("sample", 0):
        title.append(f"sample {record['sample']}")
    parts = [f"<section><h2>{' &middot; '.join(html.escape(part) for part in title if part)}</h2>"]
    if record.get("system"):
        parts += ['<div class="label">system</div>', _pre("system", record["system"])]
    references = record.get("reference") or []
    answers, reasons = record.get("answers", []), record.get("finish_reasons", [])
    prompt_tokens, completion_tokens = record.get("prompt_tokens", []), record.get("completion_tokens", [])
    for turn, asked in enumerate(record.get("turns", [])):
        parts += [f'<div class="label">user, turn {turn + 1}</div>', _pre("user", asked)]
        if turn < len(answers):
            reason = reasons[turn] if turn < len(reasons) else "?"
            counts = ""
            if turn < len(prompt_tokens) and turn < len(completion_tokens):
                counts = f", {prompt_tokens[turn]} prompt + {completion_tokens[turn]} answer tokens"
            parts.append(
                f'<div class="label">answer (<span class="{html.escape(reason)}">{html.escape(reason)}</span>'
                f"{counts})</div>"
            )
            parts.append(_pre("answer", answers[turn]))
        if turn < len(references):
            parts += ['<div class="label">reference</div>', _pre("reference", references[turn])]
    parts.append("</section>")
    return "\n".join(parts)


def answers_html(records: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    """The page for `records` (answers.jsonl dicts) under the settings `meta` (generation.json, may be empty)."""
    meta = dict(meta or {})
    template = meta.pop("chat_template", None)
    title = f"answers: {meta.get('set', '')} \u00b7 {meta.get('model', '')}".strip(" \u00b7")
    reasons = Counter(reason for record in records for reason in record.get("finish_reasons", []))
    rows = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(json.dumps(value, ensure_ascii=False))}</td></tr>"
        for key, value in meta.items()
    )
    summary = ", ".join(f"{count} {html.escape(reason)}" for reason, count in sorted(reasons.items()))
    header = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(records)} answers; turns ended by: {summary or 'none'}</p>",
        f"<table>{rows}</table>" if rows else "",
    ]
    if template:
        header.append(f"<details><summary>chat template</summary>{_pre('system', template)}</details>")
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>\n"
        + "\n".join(header + [_record_html(record) for record in records])
        + "\n</body></html>\n"
    )


def write_answers_html(
    path: str | Path, records: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None
) -> Path:
    """Writes answers_html(records, meta) to path (its directory made) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(answers_html(records, meta), encoding="utf-8")
    return path
