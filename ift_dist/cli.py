"""The `ift` command line: parses arguments and hands off to the module that does the work (imported lazily, so
`ift --help` and the launcher stay light)."""

from __future__ import annotations

import argparse
import logging
import sys


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=4096")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ift", description="ift-dist: distributed instruction fine-tuning")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="prepare, validate and inspect training data").add_subparsers(
        dest="data_command", required=True
    )
    prepare = data.add_parser("prepare", help="tokenize and pack once into Parquet shards + manifest.json")
    _add_config_args(prepare)
    prepare.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    prepare.add_argument("--num-proc", type=int, default=1, help="rendering processes")
    prepare.add_argument("--rows-per-shard", type=int, default=2048, help="rows per Parquet shard")

    validate = data.add_parser("validate", help="check every record; list each bad one; exit 1 if any")
    _add_config_args(validate)
    validate.add_argument("--num-proc", type=int, default=1)
    validate.add_argument(
        "--max-listed",
        type=int,
        default=50,
        help="bad records listed per source and dropped samples per reason",
    )
    validate.add_argument(
        "--json", action="store_true", help="print every bad record and dropped sample as one JSON object"
    )

    stats = data.add_parser("stats", help="records, rejections, turns, lengths, supervision, drops, packing")
    _add_config_args(stats)
    stats.add_argument("--num-proc", type=int, default=1)
    stats.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    preview = data.add_parser("preview", help="render N samples with the supervised part marked")
    _add_config_args(preview)
    preview.add_argument("-n", "--num-samples", type=int, default=3)
    preview.add_argument("--html", help="also write an HTML page to this path")
    preview.add_argument(
        "--no-color", action="store_true", help="mark supervised text with [[ ]] instead of color"
    )

    for name, what in (
        ("dedup", "exact and near-duplicate removal (data.quality.dedup); docs/data_quality.md"),
        ("filter", "quality filters, model score, decontamination (data.quality); docs/data_quality.md"),
    ):
        stage = data.add_parser(name, help=what)
        _add_config_args(stage)
        stage.add_argument(
            "--out", help="write quality.json, removed.jsonl and kept.jsonl (the kept records) here"
        )
        stage.add_argument("--json", action="store_true", help="print the counts as one JSON object")
        stage.add_argument("--max-listed", type=int, default=5, help="removals listed per reason")

    from ift_dist.data.diversity_command import add_report_arguments  # torch-free at import

    report = data.add_parser(
        "report", help="diversity report (HTML with plots): groups, lengths, distinct-n, ROUGE-L"
    )
    _add_config_args(report)
    add_report_arguments(report)

    from ift_dist.data.generate_cli import add_generate_arguments  # torch-free at import

    add_generate_arguments(
        data.add_parser(
            "generate", help="Self-Instruct / Alpaca data generation through an OpenAI-compatible model"
        )
    )

    from ift_dist.launcher.cli import add_arguments as add_launch_arguments  # torch-free
    from ift_dist.launcher.cli import add_train_arguments

    train = commands.add_parser(
        "train",
        help="train on this machine: `ift launch` without hostfile or Slurm (config checked first); docs/launch.md",
    )
    add_train_arguments(train)

    export = commands.add_parser(
        "export", help="write a Hugging Face model directory from a checkpoint; docs/checkpoints.md"
    )
    _add_export_arguments(export)

    from ift_dist.eval.cli import add_arguments as add_eval_arguments  # torch-free at import

    add_eval_arguments(
        commands.add_parser(
            "eval", help="benchmarks (MMLU, C-Eval, CMMLU) and held-out perplexity; docs/eval.md"
        )
    )

    launch = commands.add_parser(
        "launch", help="train here, on a hostfile's machines or as a Slurm job (--slurm); docs/launch.md"
    )
    add_launch_arguments(launch)
    return parser


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="a run directory (its `latest` checkpoint) or a step_<N> checkpoint"
    )
    parser.add_argument("out_dir", help="the Hugging Face model directory to write")
    from ift_dist.config import DType

    parser.add_argument("--dtype", default="auto", choices=DType.values(), help="auto: the training dtype")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--no-verify", action="store_true", help="skip checking the files against the marker")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="adapter runs: the base model with the adapter merged in (else: the adapter)",
    )
    parser.add_argument(
        "--base", default=None, help="with --merge: the base model (default: the run's model.name_or_path)"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from ift_dist.config import ConfigError

    try:
        if args.command == "data" and args.data_command == "generate":  # no run config: seeds in, records out
            from ift_dist.data.generate_cli import run_generate

            return run_generate(args)
        if args.command == "data":
            from ift_dist.data import commands

            return commands.run(args)
        if args.command == "train":
            from ift_dist.launcher.cli import run_local

            return run_local(args, prog="ift train")
        if args.command == "export":
            from ift_dist.export import run as export

            return export(args)
        if args.command == "eval":
            from ift_dist.eval.cli import run as evaluate

            return evaluate(args, sys.argv[1:] if argv is None else list(argv))
        if args.command == "launch":
            from ift_dist.launcher.cli import run as launch

            return launch(args)
    except ConfigError as error:
        print(f"ift: config error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
