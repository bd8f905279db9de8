"""Training throughput and peak memory of ift-dist side by side with Hugging Face `Trainer` under the same ZeRO-3
config, on the same model, the same samples in the same micro batches and the same number of optimizer steps.

    python bench/train_throughput.py [--steps 12] [--warmup-steps 2] [--max-length 512] [--hidden 384 --layers 6]
    python bench/train_throughput.py --model DIR --max-length 4096 --steps 30     # a real model (GPU machine)

Contenders, each launched with `deepspeed --num_gpus N` (N ranks; DeepSpeed's CPU accelerator + gloo without CUDA),
ZeRO-3 from the same configs/ds_zero3/zero3.json, fp32 on CPU / bf16 on GPUs, AdamW (0.9, 0.95, 1e-8, no decay),
constant learning rate, gradient clipping 1.0:
  ift        ift_dist.train: packed rows (several samples per row, boundary-safe attention), fused loss.
  ift_reference  (not by default) the same with train.loss=reference: full logits + torch cross-entropy.
  hf_padded  transformers.Trainer, one sample per row right-padded to the micro batch's longest, the model's loss.
             The baseline of the ratios.
  hf_flat    transformers.Trainer with DataCollatorWithFlattening: packed without padding, position_ids.
  ift_lora, hf_lora  (not by default) LoRA with the seeds' recipe (r 16, alpha 32, dropout 0.05 on q/k/v/o): ift-dist's
             model.adapter, and the Trainer on peft's get_peft_model with padded rows (what TRL's SFTTrainer runs).
The samples: ift-dist's own loader is run here first, per rank; each micro batch of the Trainer contenders holds
exactly the samples of the matching ift-dist micro batch (same token ids, same assistant-only labels), so every
contender trains on the same real tokens per step and the per-step losses agree up to batching numerics.

Measured per contender (bench/train_throughput_rank.py): real (non-padding) tokens per second, the median over the
steps after the warm-up of every repeat, from the wall time between optimizer-step ends on rank 0, and the same per
CPU-second of all ranks (robust to other jobs on a shared machine); peak memory per rank (CPU: resident-set
high-water mark of each rank process, the whole run; CUDA: torch's peak allocation); MFU on GPUs (the FLOPs formula
of ift_dist.metrics over the same samples, so it is the same for every contender). Printed as one table with ratios
to hf_padded. A contender that fails (out of memory on the GPU or the host, an error, --timeout) gets a row that says
so ("OOM", "failed: <its last error line>", "timeout"), and the others still run. The model is a random Llama with
the tokenizer's vocabulary unless --model names one. The work directory keeps the model, the batches, the logs and
result.json; --report-only prints its table again. One contender's run (its inputs, the launch, how it ended, its
numbers) is bench/contender_run.py.

    python bench/train_throughput.py --search-micro-batch --steps 4 --warmup-steps 2 --accumulation 1 \
        [--search-start ift=8 --search-max 32 --search-tolerance 0.25]

--search-micro-batch finds, per contender, the largest micro batch (rows per rank; the Trainer contenders get the
samples of that many packed rows) that fits: doubling from --search-start while it fits, then bisecting between the
largest fit and the smallest failure (bench/micro_batch_search.py), each probe a --steps run. It prints a line per
probe as it ends, then a table with the tokens/s at the largest fit and at the fastest probe; search.json keeps all.
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
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from contender_run import (
    CONTENDERS,
    NAMES,
    REPO,
    SHARED,
    failure_cell,
    on_gpu,
    prepare,
    run_contender,
    summarize,
    write_ift_config,
)
from micro_batch_search import search

# Imported from here by bench/profile_step.py (its run is configured like the contenders') and scripts/gpu_check.sh.
__all__ = ["add_model_arguments", "main", "write_ift_config", "write_model"]
DEFAULT_CONTENDERS = "ift,hf_padded,hf_flat"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The random Llama's shape and the tokenizer (its vocabulary): shared with bench/profile_step.py."""
    parser.add_argument("--hidden", type=int, default=384, help="random Llama: hidden size")
    parser.add_argument("--layers", type=int, default=6, help="random Llama: decoder layers")
    parser.add_argument("--heads", type=int, default=6, help="random Llama: attention heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="random Llama: key/value heads")
    parser.add_argument("--intermediate", type=int, default=1024, help="random Llama: MLP width")
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers/smollm2-135m-instruct"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an existing HF causal LM directory (default: a random Llama, below)")
    add_model_arguments(parser)
    parser.add_argument("--max-length", type=int, default=512, help="tokens per packed row and per sample")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per contender")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument(
        "--micro-batch-rows", type=int, default=1, help="ift-dist rows per rank per micro batch"
    )
    parser.add_argument("--accumulation", type=int, default=2, help="micro batches per rank per step")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--pack-buffer", type=int, default=128, help="ift-dist's data.pack_buffer")
    parser.add_argument(
        "--data-workers", type=int, default=None, help="ift-dist's data.num_workers (0 CPU, 1 GPU)"
    )
    parser.add_argument(
        "--hf-attention", default="sdpa", help="attn_implementation of the Trainer contenders"
    )
    parser.add_argument("--ift-override", action="append", default=[], help="extra key=value for ift-dist")
    parser.add_argument("--contenders", default=DEFAULT_CONTENDERS, help=f"from {CONTENDERS}")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per contender, interleaved; median reported"
    )
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where CUDA is available")
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory (kept)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per contender run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--search-micro-batch",
        action="store_true",
        help="find each contender's largest micro batch (rows per rank) that fits, each probe a --steps run",
    )
    parser.add_argument(
        "--search-start",
        default="1",
        help="first micro batch probed: N, or NAME=N,... per contender (others 1)",
    )
    parser.add_argument("--search-max", type=int, default=64, help="largest micro batch probed")
    parser.add_argument(
        "--search-tolerance",
        type=float,
        default=0.0,
        help="stop bisecting once the smallest failure is within (1 + this) x the largest fit (fewer probes)",
    )
    parser.add_argument(
        "--search-deadline-s",
        type=float,
        help="start no probe after this many seconds of the search (what was found stays a lower bound)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="print the table of the run in --workdir again (same flags)",
    )
    return parser.parse_args(argv)


def write_model(args: argparse.Namespace, tokenizer: Any, directory: Path) -> Path:
    """A random Llama with the tokenizer's vocabulary (tied embeddings, like SmolLM2), saved once for everyone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ift_dist.data.render import pad_token_id

    torch.manual_seed(args.seed)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.max_length, 512),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        eos_token_id=eos,
        pad_token_id=pad_token_id(tokenizer),
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def device_name(gpu: bool) -> str:
    if gpu:
        return torch.cuda.get_device_name(0)
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "?")
    return f"{model} ({os.cpu_count()} cores)"


def print_table(runs: dict[str, list[dict]], steps: list[dict], args: argparse.Namespace, flops: Any) -> None:
    """One markdown row per contender, ratios to hf_padded (where it ran); a contender whose runs all failed gets
    a row that says why ("OOM", "failed: <error line>", "timeout")."""
    summary = {contender: summarize(results, steps, args, flops) for contender, results in runs.items()}
    base = summary.get("hf_padded")

    def ratio(value: float, key: str) -> str:
        return f"{value / base[key]:.2f}" if base else "-"

    print(
        "| contender | tokens/s | x HF padded | tokens per CPU-s | x HF padded | peak memory / rank GiB | x HF padded "
        f"| MFU | loss step 1 | loss step {args.steps} |"
    )
    print("|---|" + "---:|" * 9)
    for contender, numbers in summary.items():
        if numbers is None:
            print(f"| {NAMES[contender]} | {failure_cell(runs[contender])} |" + " - |" * 8)
            continue
        rate, cpu_rate, memory = (
            numbers[key] for key in ("tokens_per_second", "tokens_per_cpu_second", "peak_memory_gb")
        )
        mfu_text = f"{100 * numbers['mfu']:.1f}%" if numbers["mfu"] is not None else "n/a"
        losses = numbers["losses"]
        first_loss, last_loss = (
            f"{loss:.4f}" if loss is not None else "?" for loss in (losses[0], losses[-1])
        )
        print(
            f"| {NAMES[contender]} | {rate:,.0f} | {ratio(rate, 'tokens_per_second')} | {cpu_rate:,.0f} "
            f"| {ratio(cpu_rate, 'tokens_per_cpu_second')} | {memory:.2f} | {ratio(memory, 'peak_memory_gb')} "
            f"| {mfu_text} | {first_loss} | {last_loss} |"
        )
    for contender, results in runs.items():
        ok = [result for result in results if result.get("status", "ok") == "ok"]
        failed = [failure_cell([result]) for result in results if result.get("status", "ok") != "ok"]
        if ok:
            losses = " ".join("?" if loss is None else f"{loss:.4f}" for loss in ok[0]["losses"])
            totals = ", ".join(f"{result['tokens_per_second']:,.0f}" for result in ok)
            print(f"# {contender}: losses per step {losses}; timed tokens / timed seconds per run: {totals}")
        if failed:
            print(f"# {contender}: {len(failed)} of {len(results)} runs failed: {'; '.join(failed)}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    contenders = [name.strip() for name in args.contenders.split(",") if name.strip()]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown or args.warmup_steps < 1 or args.warmup_steps >= args.steps:
        raise SystemExit(f"contenders from {CONTENDERS}; 1 <= --warmup-steps < --steps ({unknown or ''})")
    from transformers import AutoConfig, AutoModelForCausalLM

    from ift_dist.data.render import load_tokenizer
    from ift_dist.metrics import flops_model

    gpu = on_gpu(args)
    if args.report_only:
        if args.workdir is None:
            raise SystemExit("--report-only needs the --workdir of a finished run")
        setup = json.loads((args.workdir / "setup.json").read_text())
        with torch.device("meta"):
            flops = flops_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(setup["model"])))
        runs = json.loads((args.workdir / "result.json").read_text())
        print_table(runs, json.loads((args.workdir / "steps.json").read_text()), args, flops)
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ift-train-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.tokenizer)
    model = Path(args.model) if args.model else write_model(args, tokenizer, workdir / "model")
    with torch.device("meta"):
        flops = flops_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    import accelerate
    import deepspeed
    import transformers

    dtype = "bfloat16" if gpu else "float32"
    print(f"# training throughput, {args.ranks} ranks, ZeRO-3 (configs/ds_zero3/zero3.json), {dtype}")
    print(f"# device: {device_name(gpu)}; Python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
          f"deepspeed {deepspeed.__version__}")  # fmt: skip
    print(f"# date {datetime.date.today()}, commit {commit.stdout.strip()}, workdir {workdir}")
    if args.search_micro_batch:
        print(f"# model {model} ({flops.matmul_parameters / 1e6:.1f}M matmul parameters, {flops.layers} layers); "
              f"max_length {args.max_length}; search of the largest micro batch up to {args.search_max} rows per "
              f"rank, each probe {args.steps} steps ({args.warmup_steps} warm-up, untimed)")  # fmt: skip
        search(contenders, args, workdir, model, tokenizer, gpu, flops)
        return 0
    steps = prepare(args, model, tokenizer, workdir, gpu)
    tokens = sum(step["tokens"] for step in steps)
    padded = sum(step["padded_tokens"] for step in steps)
    print(f"# model {model} ({flops.matmul_parameters / 1e6:.1f}M matmul parameters, {flops.layers} layers); "
          f"max_length {args.max_length}; {args.steps} steps ({args.warmup_steps} warm-up, untimed) of "
          f"{args.micro_batch_rows * args.ranks * args.accumulation} packed rows = "
          f"{sum(step['samples'] for step in steps) / args.steps:.1f} samples, {tokens / args.steps:,.0f} real "
          f"tokens on average; padding would add {100 * (padded - tokens) / tokens:.0f}% tokens")  # fmt: skip

    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for repeat in range(args.repeat):
        for contender in contenders:
            load = os.getloadavg()[0]
            started = time.perf_counter()
            result = run_contender(contender, args, workdir, steps, workdir / f"{contender}-{repeat}.log")
            runs[contender].append(result)
            ended = "" if result["status"] == "ok" else f" ({failure_cell([result])})"
            print(f"# {contender} run {repeat + 1}: {time.perf_counter() - started:.0f} s wall{ended}, "
                  f"load average before {load:.2f}", flush=True)  # fmt: skip
    print_table(runs, steps, args, flops)
    (workdir / "result.json").write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
