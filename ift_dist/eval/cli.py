"""`ift eval mc|ppl|generate|ifeval|judge`: parse, load the model on every rank, run the evaluation, write and print
on rank 0 (the judge needs no model: it calls an endpoint).

    ift eval mc MODEL_OR_RUN --benchmark mmlu [--subjects ...] [--shots 5] [--scoring letter] [--num-gpus N]
    ift eval ppl MODEL_OR_RUN --data FILE... [--text FILE...] [--template ...] [--num-gpus N]
    ift eval generate MODEL_OR_RUN --prompts vicuna_bench [--limit N] [--temperature T] [--num-gpus N]
    ift eval ifeval MODEL_OR_RUN [--limit N] [--num-gpus N]     (or --answers DIR: score earlier answers)
    ift eval judge --answers DIR... [--baseline DIR] --judge-url URL --judge-model NAME
    deepspeed --num_gpus N --module ift_dist.eval mc ...      (what `--num-gpus N` runs; N ranks, a replica each)

Exit codes: 0 done, 1 the evaluation failed (a bad benchmark file, a model that does not load), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ift_dist import exit_codes
from ift_dist.config import BENCHMARK_NAMES, BenchmarkConfig, ConfigError, DType, McScoring, PromptFormat
from ift_dist.eval.cli_generate import add_generate_arguments, run_generate, run_ifeval, run_ifeval_on_file
from ift_dist.eval.judge import add_judge_arguments, run_judge

logger = logging.getLogger("ift_dist.eval")

# Where results go without --out: eval-results/<model>/<benchmark or ppl>, beside wherever the command runs.
RESULTS_ROOT = Path("eval-results")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommands of `ift eval` (and of `python -m ift_dist.eval`)."""
    commands = parser.add_subparsers(dest="eval_command", required=True)
    defaults = BenchmarkConfig()
    mc = commands.add_parser("mc", help="multiple-choice benchmarks: MMLU, C-Eval, CMMLU; docs/eval.md")
    _add_common(mc)
    mc.add_argument(
        "--benchmark",
        required=True,
        help=f"{', '.join(BENCHMARK_NAMES)} or a directory in one of their layouts",
    )
    mc.add_argument("--data-dir", default="", help="where mmlu/ ceval/ cmmlu/ are (default: $IFT_EVAL_DATA, "
                    "else ../shared/data/eval)")  # fmt: skip
    mc.add_argument("--split", default="", help="default: test (MMLU, CMMLU), val (C-Eval)")
    mc.add_argument("--subjects", nargs="+", default=[], help="subject file stems (default: all)")
    mc.add_argument(
        "--shots", type=int, default=defaults.shots, help="few-shot examples from the dev split, 0..5"
    )
    mc.add_argument("--scoring", default=defaults.scoring.value, choices=McScoring.values())
    mc.add_argument("--format", default=defaults.format.value, choices=PromptFormat.values())
    mc.add_argument("--limit", type=int, default=0, help="the first N questions of each subject (0 = all)")
    mc.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per forward pass")

    ppl = commands.add_parser(
        "ppl", help="held-out perplexity over assistant tokens, as training counts them"
    )
    _add_common(ppl)
    ppl.add_argument(
        "--data", nargs="+", default=[], help="record files (each one source), any training format"
    )
    ppl.add_argument(
        "--text", nargs="+", default=[], help='raw-text files ({"text": ...} per record): every token scored'
    )
    ppl.add_argument(
        "--template", help="data.template (default: the run's, else the tokenizer's chat template)"
    )
    ppl.add_argument("--max-length", type=int, help="data.max_length (default: the run's, else 2048)")
    ppl.add_argument("--batch-rows", type=int, default=4, help="rows per forward pass")

    generate = commands.add_parser("generate", help="answers to held-out prompts (MT-bench, Vicuna, ...)")
    _add_common(generate)
    add_generate_arguments(generate)
    ifeval = commands.add_parser("ifeval", help="IFEval: generate, then lm-eval's instruction checkers")
    _add_common(ifeval, model_optional=True)
    add_generate_arguments(ifeval, ifeval=True)
    ifeval.add_argument("--answers", help="score this answers.jsonl (or its directory) instead of generating")
    judge = commands.add_parser("judge", help="an LLM judge on answers: MT-bench single grades or pairwise")
    add_judge_arguments(judge)


def _add_common(parser: argparse.ArgumentParser, *, model_optional: bool = False) -> None:
    parser.add_argument(
        "model",
        nargs="?" if model_optional else None,
        help="a Hugging Face model directory, a run directory or a step_<N> checkpoint",
    )
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    parser.add_argument(
        "--dtype", default="auto", choices=DType.values(), help="auto: bfloat16 on GPUs, else float32"
    )
    parser.add_argument("--out", help=f"results directory (default: {RESULTS_ROOT}/<model>/<benchmark>)")
    parser.add_argument(
        "--num-gpus", type=int, default=1, help="ranks on this machine (CPU: processes), a replica each"
    )


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """`ift eval ...` from the `ift` command: here in this process, or on --num-gpus ranks through DeepSpeed's
    launcher (argv: the command line after `ift`)."""
    if args.eval_command == "judge":
        return run_judge(args)
    if args.eval_command == "ifeval" and (args.answers or not args.model):
        return _without_model(args)
    if args.num_gpus > 1 and "WORLD_SIZE" not in os.environ:
        return _spawn(args.num_gpus, argv[argv.index("eval") + 1 :])
    return evaluate(args)


def _spawn(ranks: int, argv: list[str]) -> int:
    from ift_dist.launcher.local import choose_master_port
    from ift_dist.launcher.runner import rank_environment
    from ift_dist.launcher.topology import detect_gpus

    kept, skip = [], False
    for item in argv:  # the ranks run the same command without --num-gpus
        if skip:
            skip = False
        elif item == "--num-gpus":
            skip = True
        elif not item.startswith("--num-gpus="):
            kept.append(item)
    runner = [
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(choose_master_port(None)),
        "--log_level",
        "error",
    ]
    command = [
        sys.executable,
        "-u",
        "-m",
        "deepspeed.launcher.runner",
        *runner,
        "--module",
        "ift_dist.eval",
        *kept,
    ]
    environ = dict(os.environ)
    environ.update(rank_environment(environ, cpu=not detect_gpus(environ), ranks_per_node=ranks))
    return subprocess.call(command, env=environ)


def _without_model(args: argparse.Namespace) -> int:
    if not args.answers:
        print(
            "ift eval ifeval: give MODEL_OR_RUN (generate, then score) or --answers (score)", file=sys.stderr
        )
        return exit_codes.CONFIG_ERROR
    from ift_dist.eval.ifeval import IfevalError

    try:
        return run_ifeval_on_file(args)
    except (IfevalError, OSError, ValueError) as error:
        print(f"ift eval: {error}", file=sys.stderr)
        return exit_codes.FAILED


def evaluate(args: argparse.Namespace) -> int:
    """Every rank: load, evaluate, and (rank 0) write and print."""
    from ift_dist import dist

    dist.set_single_process_defaults()
    if dist.world_size() > 1:
        from ift_dist import engine

        engine.init_distributed()
    try:
        if args.eval_command == "mc":
            cfg = benchmark_config(args)
            cfg.validate("ift eval mc")
        if args.eval_command == "ppl" and not args.data and not args.text:  # before loading the model
            raise ConfigError(
                "ift eval ppl: name files to score with --data (records) and/or --text (raw text)"
            )
        from ift_dist.eval.benchmarks import BenchmarkError
        from ift_dist.eval.model_source import model_directory
        from ift_dist.eval.prompt_sets import set_label

        with model_directory(args.model, dtype=args.dtype) as source:
            model, tokenizer = load_for_eval(source.directory, args.tokenizer, args.dtype)
            if args.eval_command == "mc":
                return _run_mc(args, cfg, source, model, tokenizer)
            if args.eval_command == "ppl":
                return _run_ppl(args, source, model, tokenizer)
            runner = run_generate if args.eval_command == "generate" else run_ifeval
            name = f"generate-{set_label(args.prompts)}" if args.eval_command == "generate" else "ifeval"
            return runner(args, source, model, tokenizer, _out_dir(args, source, name))
    except ConfigError as error:
        print(f"ift eval: {error}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    except (BenchmarkError, OSError, ValueError) as error:
        print(f"ift eval: {error}", file=sys.stderr)
        return exit_codes.FAILED


def benchmark_config(args: argparse.Namespace) -> BenchmarkConfig:
    return BenchmarkConfig(
        name=args.benchmark,
        data_dir=args.data_dir,
        split=args.split,
        subjects=list(args.subjects),
        limit=args.limit,
        shots=args.shots,
        scoring=McScoring(args.scoring),
        format=PromptFormat(args.format),
        batch_size=args.batch_size,
    )


def load_for_eval(directory: Path, tokenizer_path: str | None, dtype: str) -> tuple[Any, Any]:
    """The model in eval mode on this rank's device (a full replica) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ift_dist import dist
    from ift_dist.model import resolve_dtype

    device = dist.device()
    torch_dtype = resolve_dtype(DType(dtype), device)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, attn_implementation="sdpa")
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or directory)
    return model, tokenizer


def _out_dir(args: argparse.Namespace, source: Any, name: str) -> Path:
    if args.out:
        return Path(args.out)
    model = Path(args.model).resolve()
    label = (
        model.name
        if source.checkpoint is None
        else f"{source.checkpoint.parent.parent.name}-{source.checkpoint.name}"
    )
    return RESULTS_ROOT / label / name


def _run_mc(args: argparse.Namespace, cfg: BenchmarkConfig, source: Any, model: Any, tokenizer: Any) -> int:
    from ift_dist import dist
    from ift_dist.config import benchmark_label
    from ift_dist.eval.mc import evaluate_benchmark, markdown_table, write_results

    result = evaluate_benchmark(model, tokenizer, cfg, device=dist.device(), show_progress=dist.rank() == 0)
    if dist.rank() == 0:
        result.settings["model"] = source.describe()
        out = _out_dir(args, source, benchmark_label(cfg))
        write_results(out, result)
        print(markdown_table(result))
        print(f"\nresults: {out}/results.json, per question: {out}/predictions.jsonl")
    return exit_codes.OK


def _run_ppl(args: argparse.Namespace, source: Any, model: Any, tokenizer: Any) -> int:
    from ift_dist import dist
    from ift_dist.config import load_config
    from ift_dist.eval.ppl import data_config_for, evaluate_perplexity, format_table

    base = load_config(str(source.run_config), []).data if source.run_config is not None else None
    data = data_config_for(
        args.data,
        text_files=args.text,
        base=base,
        tokenizer=args.tokenizer,
        template=args.template,
        max_length=args.max_length,
    )
    result = evaluate_perplexity(
        model,
        tokenizer,
        data,
        device=dist.device(),
        batch_rows=args.batch_rows,
        show_progress=dist.rank() == 0,
    )
    if dist.rank() == 0:
        out = _out_dir(args, source, "ppl")
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "model": source.describe(),
            "data": list(args.data),
            "text": list(args.text),
            **result.to_json(),
        }
        (out / "results.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        print(format_table(result))
        print(f"\nresults: {out}/results.json")
    return exit_codes.OK


def main(argv: list[str] | None = None) -> int:
    """`python -m ift_dist.eval` (one rank, or each rank under `deepspeed --module ift_dist.eval`)."""
    from ift_dist import dist

    parser = argparse.ArgumentParser(
        prog="python -m ift_dist.eval", description="evaluate a model; docs/eval.md"
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from deepspeed
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(argv)
    dist.setup_logging(args.verbose)
    code = exit_codes.FAILED
    try:
        code = evaluate(args)
    except Exception:
        logger.exception("evaluation failed")
    finally:
        dist.shutdown(together=code == exit_codes.OK)
    return code
