"""`ift data report CONFIG --html OUT`: reads the training sources through data.quality and writes the diversity
report (diversity.build_report) as an HTML page and, with --json, a JSON file. Torch-free at import."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ift data report` (CONFIG and the overrides are added by the caller, as for every data
    command)."""
    parser.add_argument("--html", required=True, help="the HTML page to write (a directory gets report.html)")
    parser.add_argument("--json", help="also write the report as one JSON object to this file")
    parser.add_argument(
        "--sample", type=int, default=500, help="records (seeded) scored for ROUGE-L, languages and words"
    )
    parser.add_argument(
        "--by",
        default="source,category",
        help="groupings, comma-separated, of source, category, cluster (near-duplicate cluster)",
    )
    parser.add_argument(
        "--no-quality", action="store_true", help="report every valid record, without running data.quality"
    )
    parser.add_argument(
        "--no-tokens", action="store_true", help="lengths in characters only (no tokenizer is loaded)"
    )


def run_report(args: argparse.Namespace) -> int:
    from ift_dist.config import load_config
    from ift_dist.data.contracts import BadRecordError, DataFileError

    config = load_config(args.config, args.overrides)
    groupings = [name.strip() for name in args.by.split(",") if name.strip()]
    unknown = sorted(set(groupings) - {"source", "category", "cluster"})
    if unknown or args.sample < 0:
        what = f"--by: unknown grouping(s) {unknown}" if unknown else f"--sample: {args.sample} is negative"
        print(f"ift data report: {what}", file=sys.stderr)
        return 2
    tokenizer = None if args.no_tokens else _tokenizer(config)
    try:
        texts, removals, clusters = collect_texts(config, quality=not args.no_quality, tokenizer=tokenizer)
    except (DataFileError, BadRecordError) as error:
        print(f"ift data report: {error}", file=sys.stderr)
        return 1
    from ift_dist.data.diversity import build_report
    from ift_dist.data.diversity_plots import render_html

    report = build_report(
        texts,
        sample=args.sample,
        seed=config.seed,
        tokenizer=tokenizer,
        clusters=clusters,
        removals=removals,
        groupings=groupings,
    )
    path = report_path(args.html)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report, title=f"ift data report: {args.config}"), encoding="utf-8")
    print(f"wrote {path}")
    if args.json:
        json_path = Path(args.json).expanduser().absolute()
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {json_path}")
    return 0


def report_path(requested: str) -> Path:
    """Exactly the path given (absolute, so the message names the file); a directory, or a path ending in "/",
    gets report.html inside it."""
    path = Path(requested).expanduser()
    if path.is_dir() or requested.endswith(("/", "\\")):
        path = path / "report.html"
    return path.absolute()


def _tokenizer(config: Any) -> Any:
    if not (config.data.tokenizer or config.model.name_or_path):
        return None
    from ift_dist.data.render import load_tokenizer

    return load_tokenizer(config.tokenizer_path)


def collect_texts(config: Any, *, quality: bool, tokenizer: Any = None) -> tuple[list, list, list]:
    """The kept records of the training sources as QualityTexts (source order, record order), what data.quality
    removed and its near-duplicate clusters. Bad records are skipped (`ift data validate` lists them)."""
    from ift_dist.data.contracts import Conversation
    from ift_dist.data.loader import scan_sources
    from ift_dist.data.quality.stage import quality_active, quality_dir, run_quality
    from ift_dist.data.quality.texts import QualityText

    scanned = scan_sources(config.data.sources, "skip")
    removals: list = []
    clusters: list = []
    if quality and quality_active(config.data.quality):
        result = run_quality(
            scanned, config.data, tokenizer=tokenizer, work_dir=quality_dir(config.output_dir)
        )
        result.apply(scanned)
        removals, clusters = result.removals, result.clusters
    texts = []
    for item in scanned:
        for index in item.scan.valid_indices.tolist():
            record = item.source.get(index)
            if isinstance(record, Conversation):
                texts.append(QualityText.of(record))
    return texts, removals, clusters
