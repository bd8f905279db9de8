"""The `ift data ...` subcommands: prepare, validate, stats, preview, dedup, filter, report (argument handling and
printing only; `ift data generate` is ift_dist/data/generate_cli.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ift_dist.config import load_config
from ift_dist.data.contracts import BadRecordError, DataFileError, TextDocument


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    try:
        return COMMANDS[args.data_command](config, args)
    except (DataFileError, BadRecordError) as error:
        print(f"ift data {args.data_command}: {error}", file=sys.stderr)
        return 1


def _prepare(config, args) -> int:
    from ift_dist.data.prepare import prepare

    manifest = prepare(config, args.out, num_proc=args.num_proc, rows_per_shard=args.rows_per_shard)
    packing = manifest["report"]["packing"]
    print(
        f"wrote {manifest['rows']} rows, {manifest['tokens']} tokens in {len(manifest['shards'])} shards to {args.out} "
        f"({manifest['tokens_per_second']:.0f} tokens/s, packing efficiency {100 * packing['efficiency']:.2f}%)"
    )
    return 0


def _validate(config, args) -> int:
    """Lists every bad record (up to --max-listed per source) and every dropped sample (up to --max-listed per
    reason) with its record and why; `--json` prints all of them as one JSON object instead. Exit 1 if there is a
    bad record or a sample the template could not mask; too-long samples are listed but are not errors."""
    from ift_dist.data.quality.stage import quality_dir, scan_training_sources
    from ift_dist.data.report import analyze

    config.data.on_bad_record = "skip"  # list them all instead of stopping at the first
    scanned = scan_training_sources(config.data, work_dir=quality_dir(config.output_dir))
    report = analyze(config, num_proc=args.num_proc, scanned=scanned)  # the same scan: each source read once
    failed = any(item.scan.bad for item in scanned)
    unmaskable = {
        reason: n for reason, n in report["samples"]["dropped_by_reason"].items() if reason != "too_long"
    }
    failed |= bool(unmaskable)
    if getattr(args, "json", False):
        print(json.dumps(_validate_json(scanned, report, failed), indent=2, ensure_ascii=False))
        return 1 if failed else 0
    from ift_dist.data.views import format_drops

    for item in scanned:
        scan = item.scan
        removed = f", {len(item.removals)} removed by data.quality" if item.removals else ""
        print(
            f"{scan.name}: {scan.num_records} records, {len(scan.valid_indices)} valid, {len(scan.bad)} bad"
            + removed
        )
        for bad in scan.bad[: args.max_listed]:
            print(f"  {bad}")
        if len(scan.bad) > args.max_listed:
            print(f"  ... and {len(scan.bad) - args.max_listed} more (--json lists every one)")
    samples = report["samples"]
    dropped = samples["dropped_by_reason"]
    print(
        f"rendered {samples['rendered']} samples; dropped {samples['dropped']}: "
        + (", ".join(f"{reason} {n}" for reason, n in sorted(dropped.items())) or "none")
    )
    if samples["per_turn_conversations"]:
        print(
            f"per-turn (data.multi_turn_mode): {samples['per_turn_conversations']} conversations gave "
            f"{samples['per_turn_samples']} samples, one per assistant turn"
        )
    if samples["text_documents"]:
        print(
            f"raw text: {samples['text_documents']} documents gave {samples['text_chunks']} chunks (samples)"
        )
    for line in format_drops(report["dropped_samples"], args.max_listed):
        print(line)
    print("FAILED" if failed else "OK")
    return 1 if failed else 0


def _validate_json(scanned, report, failed: bool) -> dict:
    """Everything `ift data validate` found, unabridged: every bad record and every dropped sample."""
    return {
        "ok": not failed,
        "sources": [
            {
                "name": item.scan.name,
                "records": item.scan.num_records,
                "valid": len(item.scan.valid_indices),
                "bad": [{**dataclasses.asdict(bad), "message": str(bad)} for bad in item.scan.bad],
            }
            for item in scanned
        ],
        "samples": report["samples"],
        "dropped_samples": report["dropped_samples"],
        "quality": report["quality"],
    }


def _stats(config, args) -> int:
    from ift_dist.data.report import analyze
    from ift_dist.data.views import format_report

    report = analyze(config, num_proc=args.num_proc)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report))
    return 0


def _preview(config, args) -> int:
    from ift_dist.data.contracts import RenderedSample
    from ift_dist.data.loader import build_loader
    from ift_dist.data.quality.stage import quality_dir, scan_training_sources
    from ift_dist.data.render import load_tokenizer
    from ift_dist.data.report import batch_rows
    from ift_dist.data.views import format_sample, removals_html, samples_html

    tokenizer = load_tokenizer(config.tokenizer_path)

    data = dataclasses.replace(config.data, packing=False, num_workers=0, prepared=None)
    scanned = scan_training_sources(data, tokenizer=tokenizer, work_dir=quality_dir(config.output_dir))
    loader = build_loader(data, tokenizer, rank=0, world_size=1, rows_per_batch=1, epochs=1, scanned=scanned)
    removed = [  # the first -n removals of each source, with the record's text
        (removal.to_json(), item.source.get(removal.ref.index))
        for item in scanned
        for removal in item.removals[: args.num_samples]
    ]
    removed = [(r, "\n\n".join(f"{m.role}: {m.content}" for m in c.messages)) for r, c in removed]
    samples = []
    for batch in loader:
        for row in batch_rows(batch):
            samples.append(RenderedSample(row.input_ids, row.labels, row.refs[0]))
        if len(samples) >= args.num_samples:
            break
    color = not args.no_color and sys.stdout.isatty()
    for sample in samples:
        print(format_sample(sample, tokenizer, color=color))
        print()
    for removal, _ in removed:
        matched = f" (matches {removal['matched']})" if removal["matched"] else ""
        print(f"removed by data.quality: {removal['ref']} {removal['reason']}{matched} {removal['detail']}")
    if args.html:
        path = html_path(args.html)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(samples_html(samples, tokenizer, extra=removals_html(removed)))
        print(f"wrote {path}")
    return 0


def html_path(requested: str) -> Path:
    """Where `--html` writes: exactly the path given, relative to the working directory; a directory (one that
    exists, or a path ending in "/") gets preview.html inside it. Absolute, so the message names the file."""
    path = Path(requested).expanduser()
    if path.is_dir() or requested.endswith(("/", "\\")):
        path = path / "preview.html"
    return path.absolute()


def _quality_stage(config, args) -> int:
    """`ift data dedup|filter CONFIG`: one wing of data.quality on its own. dedup runs data.quality.dedup (exact and
    near when neither is switched on); filter runs the filters, the model score and the decontamination. Prints the
    removals by reason with examples; --out writes them and the kept records (OpenAI messages JSONL)."""
    from ift_dist.data.loader import scan_sources
    from ift_dist.data.quality.stage import quality_dir, run_quality, write_quality_report
    from ift_dist.data.report import quality_stats
    from ift_dist.data.views import format_quality

    quality = config.data.quality
    if args.data_command == "dedup":
        keep = dataclasses.replace(quality.dedup)
        if not (keep.exact or keep.near):
            keep.exact = keep.near = True
        quality = type(quality)(dedup=keep)
    else:
        quality = dataclasses.replace(quality, dedup=type(quality.dedup)(), balance=type(quality.balance)())
    data = dataclasses.replace(config.data, quality=quality)
    tokenizer = None
    bounds = quality.filters
    if (
        bounds.min_prompt_tokens
        or bounds.max_prompt_tokens
        or bounds.min_answer_tokens
        or bounds.max_answer_tokens
    ):
        from ift_dist.data.render import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer_path)
    scanned = scan_sources(data.sources, "skip")
    result = run_quality(scanned, data, tokenizer=tokenizer, work_dir=quality_dir(config.output_dir))
    result.apply(scanned)
    sources = {}
    for item in scanned:
        kept = len(item.scan.valid_indices)
        sources[item.scan.name] = {
            "valid": kept + len(item.removals),
            "removed": len(item.removals),
            "kept": kept,
        }
    summary = {"sources": sources, **result.to_json()}
    if args.out:
        out = Path(args.out)
        write_quality_report(result, out)
        _write_kept(scanned, out / "kept.jsonl")
        summary["out"] = str(out)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    for name, counts in sources.items():
        print(f"{name}: {counts['valid']} valid records, {counts['removed']} removed, {counts['kept']} kept")
    for line in format_quality(quality_stats(scanned), args.max_listed) or ["\nnothing removed"]:
        print(line)
    if result.clusters:
        print(f"near-duplicate clusters: {len(result.clusters)} (largest {max(map(len, result.clusters))})")
    if args.out:
        print(f"wrote {args.out}/quality.json, removed.jsonl and kept.jsonl")
    return 0


def _report(config, args) -> int:
    from ift_dist.data.diversity_command import run_report

    return run_report(args)


def _write_kept(scanned, path: Path) -> None:
    """The kept records as OpenAI messages JSONL (any training format reads back the same conversations)."""
    with path.open("w", encoding="utf-8") as handle:
        for item in scanned:
            for index in item.scan.valid_indices.tolist():
                conversation = item.source.get(index)
                if isinstance(conversation, TextDocument):
                    # Not a conversation (format text): data.quality does not judge it; it stays in its own files.
                    continue
                messages = [
                    {
                        "role": m.role,
                        "content": m.content,
                        **({"tool_calls": m.tool_calls} if m.tool_calls else {}),
                    }
                    for m in conversation.messages
                ]
                record = {"messages": messages, "source": str(conversation.ref)}
                if conversation.tools:
                    record["tools"] = conversation.tools
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")


COMMANDS = {
    "prepare": _prepare,
    "validate": _validate,
    "stats": _stats,
    "preview": _preview,
    "dedup": _quality_stage,
    "filter": _quality_stage,
    "report": _report,
}
