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
to hf_padded. The model is a random Llama with the tokenizer's vocabulary unless --model names one. The work
directory keeps the model, the batches, the logs and result.json; --report-only prints its table again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONTENDERS = ("ift", "ift_reference", "hf_padded", "hf_flat", "ift_lora", "hf_lora")
DEFAULT_CONTENDERS = "ift,hf_padded,hf_flat"
NAMES = {
    "ift": "ift-dist (packed rows, fused loss)",
    "ift_reference": "ift-dist, train.loss=reference",
    "hf_padded": "HF Trainer, padded",
    "hf_flat": "HF Trainer, DataCollatorWithFlattening",
    "ift_lora": "ift-dist, LoRA (model.adapter)",
    "hf_lora": "HF Trainer + peft LoRA, padded",
}
DEFAULT_SOURCES = [
    {"path": str(SHARED / "data/llamafactory/alpaca_en_demo.json"), "name": "alpaca_en"},
    {
        "path": str(SHARED / "data/llamafactory/identity.json"),
        "name": "identity",
        "placeholders": {"name": "Nimbus", "author": "the ift-dist team"},
    },
]
logger = logging.getLogger(__name__)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an existing HF causal LM directory (default: a random Llama, below)")
    parser.add_argument("--hidden", type=int, default=384, help="random Llama: hidden size")
    parser.add_argument("--layers", type=int, default=6, help="random Llama: decoder layers")
    parser.add_argument("--heads", type=int, default=6, help="random Llama: attention heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="random Llama: key/value heads")
    parser.add_argument("--intermediate", type=int, default=1024, help="random Llama: MLP width")
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers/smollm2-135m-instruct"))
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
        "--report-only",
        action="store_true",
        help="print the table of the run in --workdir again (same flags)",
    )
    return parser.parse_args()


def on_gpu(args: argparse.Namespace) -> bool:
    return torch.cuda.is_available() and not args.cpu


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


def write_ift_config(args: argparse.Namespace, model: Path, workdir: Path) -> Path:
    workers = args.data_workers if args.data_workers is not None else (1 if on_gpu(args) else 0)
    config = {
        "output_dir": str(workdir / "ift-run"),  # each ift contender overrides it
        "seed": args.seed,
        "model": {"name_or_path": str(model)},
        "data": {
            "tokenizer": args.tokenizer,
            "max_length": args.max_length,
            "pack_buffer": args.pack_buffer,
            "num_workers": workers,
            "sources": DEFAULT_SOURCES,
        },
        "train": {
            "max_steps": args.steps,
            "global_batch_rows": args.micro_batch_rows * args.ranks * args.accumulation,
            "micro_batch_rows": args.micro_batch_rows,
            "learning_rate": args.learning_rate,
            "lr_schedule": "constant",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "zero_config": str(REPO / "configs/ds_zero3/zero3.json"),
            "save_at_end": False,
        },
    }
    if not on_gpu(args):
        config["model"]["dtype"] = "float32"
    path = workdir / "ift.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def the_batches(config_path: Path, args: argparse.Namespace, tokenizer: Any) -> tuple[list[Any], list[dict]]:
    """ift-dist's micro batches of every rank, as the Trainer contenders get them: item k is rank k % W's micro batch
    k // W (accelerate hands batch k of a sequential sampler to rank k % W), each a list of (input_ids, labels) of
    the samples in its rows. Also per step: real tokens, supervised tokens, samples and the sample lengths."""
    from ift_dist.config import load_config
    from ift_dist.data.loader import build_loader, scan_sources
    from ift_dist.data.render import Renderer

    cfg = load_config(config_path, ["data.num_workers=0", *args.ift_override])  # the same batches, in-process
    renderer = Renderer(tokenizer, cfg.data)
    scanned = scan_sources(cfg.data.sources, cfg.data.on_bad_record)
    per_step = args.accumulation
    per_rank = []
    for rank in range(args.ranks):
        loader = build_loader(
            cfg.data, tokenizer, rank=rank, world_size=args.ranks, rows_per_batch=args.micro_batch_rows,
            split="train", scanned=scanned, renderer=renderer,
        )  # fmt: skip
        batches = iter(loader)
        per_rank.append([next(batches) for _ in range(args.steps * per_step)])
    keys = ("tokens", "supervised_tokens", "samples", "padded_tokens")
    items: list[Any] = []
    steps: list[dict] = [{**dict.fromkeys(keys, 0), "lengths": []} for _ in range(args.steps)]
    for micro in range(args.steps * per_step):
        for rank in range(args.ranks):
            batch = per_rank[rank][micro]
            samples = []
            for row, lengths in enumerate(batch.seq_lens):
                start = 0
                for length in lengths:
                    ids = batch.input_ids[row, start : start + length].tolist()
                    labels = batch.labels[row, start : start + length].tolist()
                    samples.append((ids, labels))
                    start += length
            items.append(samples)
            step = steps[micro // per_step]
            step["tokens"] += sum(len(ids) for ids, _ in samples)
            step["supervised_tokens"] += batch.num_loss_tokens
            step["samples"] += len(samples)
            step["lengths"] += [len(ids) for ids, _ in samples]
            step["padded_tokens"] += len(samples) * max(len(ids) for ids, _ in samples)
    return items, steps


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(contender: str, args: argparse.Namespace, workdir: Path, log: Path) -> None:
    """`deepspeed --num_gpus N bench/train_throughput_rank.py`; on a timeout the whole process group is killed."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    port = free_port()
    command = [str(deepspeed), "--num_gpus", str(args.ranks), "--master_port", str(port)]
    command += [
        str(REPO / "bench/train_throughput_rank.py"),
        "--contender",
        contender,
        "--workdir",
        str(workdir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if not on_gpu(args):
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    with log.open("w") as output:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = "timeout"
    # DeepSpeed's CPU shared-memory allreduce leaves a 66 MB segment per rank in /dev/shm, named after the port
    # (ift-dist unlinks its own in engine.init_distributed; the Trainer contenders do not). The ranks are gone now.
    for segment in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        segment.unlink(missing_ok=True)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{contender} failed ({code}); log {log}:\n{tail}")


def read_run(contender: str, args: argparse.Namespace, workdir: Path, steps: list[dict]) -> dict[str, Any]:
    ranks = [json.loads((workdir / contender / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    rank0 = ranks[0]["steps"]
    if len(rank0) != args.steps:
        raise RuntimeError(f"{contender}: {len(rank0)} optimizer steps recorded, expected {args.steps}")
    for record, expected in zip(rank0, steps, strict=True):
        # ift-dist reports them: its ranks must have read the very batches the Trainer contenders got.
        for key in ("tokens", "supervised_tokens"):
            if key in record and record[key] != expected[key]:
                raise RuntimeError(
                    f"{contender} step {record['step']}: {key} {record[key]} != {expected[key]} precomputed"
                )
    first = args.warmup_steps  # >= 1: step k's time is end(k) - end(k - 1)
    step_seconds = [rank0[k]["time"] - rank0[k - 1]["time"] for k in range(first, args.steps)]
    cpu_seconds = [
        sum(rank["steps"][k]["cpu"] - rank["steps"][k - 1]["cpu"] for rank in ranks)
        for k in range(first, args.steps)
    ]  # all ranks
    return {
        "step_seconds": step_seconds,
        "step_cpu_seconds": cpu_seconds,
        "tokens_per_second": sum(step["tokens"] for step in steps[first:]) / sum(step_seconds),
        "peak_memory_gb": [rank["peak_memory_gb"] for rank in ranks],
        "losses": [record.get("loss") for record in rank0],
        "grad_norms": [record.get("grad_norm") for record in rank0],
    }


def device_name(gpu: bool) -> str:
    if gpu:
        return torch.cuda.get_device_name(0)
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "?")
    return f"{model} ({os.cpu_count()} cores)"


def print_table(runs: dict[str, list[dict]], steps: list[dict], args: argparse.Namespace, flops: Any) -> None:
    """One markdown row per contender. "tokens/s": the median over the timed steps of every run of the step's real
    tokens / its wall time. "tokens per CPU-s": the same over the CPU time of all ranks, the work a step costs: on a
    machine shared with other jobs it is not inflated by waiting for a core, as wall time is."""
    from ift_dist.metrics import peak_flops

    first = args.warmup_steps
    peak = peak_flops(torch.device("cuda")) if on_gpu(args) else None
    step_flops = [flops.flops(step["lengths"]) for step in steps[first:]]

    def per_step(results: list[dict], key: str) -> list[tuple[int, float]]:
        return [(first + step, seconds) for result in results for step, seconds in enumerate(result[key])]

    summary = {}
    for contender, results in runs.items():
        wall, cpu = per_step(results, "step_seconds"), per_step(results, "step_cpu_seconds")
        mfu = None
        if peak:
            mfu = statistics.median(
                step_flops[k - first] / (seconds * args.ranks * peak) for k, seconds in wall
            )
        summary[contender] = (
            statistics.median(steps[k]["tokens"] / seconds for k, seconds in wall),
            statistics.median(steps[k]["tokens"] / seconds for k, seconds in cpu),
            max(max(result["peak_memory_gb"]) for result in results),
            mfu,
            results[0]["losses"],
        )
    base = summary.get("hf_padded")

    def ratio(value: float, index: int) -> str:
        return f"{value / base[index]:.2f}" if base else "-"

    print(
        "| contender | tokens/s | x HF padded | tokens per CPU-s | x HF padded | peak memory / rank GiB | x HF padded "
        f"| MFU | loss step 1 | loss step {args.steps} |"
    )
    print("|---|" + "---:|" * 9)
    for contender, (rate, cpu_rate, memory, mfu, losses) in summary.items():
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        first_loss, last_loss = (
            f"{loss:.4f}" if loss is not None else "?" for loss in (losses[0], losses[-1])
        )
        print(
            f"| {NAMES[contender]} | {rate:,.0f} | {ratio(rate, 0)} | {cpu_rate:,.0f} | {ratio(cpu_rate, 1)} "
            f"| {memory:.2f} | {ratio(memory, 2)} | {mfu_text} | {first_loss} | {last_loss} |"
        )
    for contender, results in runs.items():
        losses = " ".join("?" if loss is None else f"{loss:.4f}" for loss in results[0]["losses"])
        totals = ", ".join(f"{result['tokens_per_second']:,.0f}" for result in results)
        print(f"# {contender}: losses per step {losses}; timed tokens / timed seconds per run: {totals}")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    contenders = [name.strip() for name in args.contenders.split(",") if name.strip()]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown or args.warmup_steps < 1 or args.warmup_steps >= args.steps:
        raise SystemExit(f"contenders from {CONTENDERS}; 1 <= --warmup-steps < --steps ({unknown or ''})")
    from transformers import AutoConfig, AutoModelForCausalLM

    from ift_dist.data.render import load_tokenizer, pad_token_id
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
    config_path = write_ift_config(args, model, workdir)
    items, steps = the_batches(config_path, args, tokenizer)
    (workdir / "batches.json").write_text(json.dumps(items))
    (workdir / "steps.json").write_text(json.dumps(steps))
    with torch.device("meta"):
        flops = flops_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)))
    pad_id = pad_token_id(tokenizer)
    setup = {
        "model": str(model),
        "dtype": "bfloat16" if gpu else "float32",
        "zero_config": str(REPO / "configs/ds_zero3/zero3.json"),
        "accumulation_steps": args.accumulation,
        "steps": args.steps,
        "learning_rate": args.learning_rate,
        "fused_adamw": gpu,  # what ift-dist's engine.build_optimizer picks
        "hf_attention": args.hf_attention,
        "pad_id": int(pad_id),
        "seed": args.seed,
        "ift_overrides": args.ift_override,
    }
    (workdir / "setup.json").write_text(json.dumps(setup, indent=1))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    tokens = sum(step["tokens"] for step in steps)
    padded = sum(step["padded_tokens"] for step in steps)
    print(
        f"# training throughput, {args.ranks} ranks, ZeRO-3 (configs/ds_zero3/zero3.json), {setup['dtype']}"
    )
    import accelerate
    import deepspeed
    import transformers

    print(f"# device: {device_name(gpu)}; Python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
          f"deepspeed {deepspeed.__version__}")  # fmt: skip
    print(f"# date {datetime.date.today()}, commit {commit.stdout.strip()}, workdir {workdir}")
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
            launch(contender, args, workdir, workdir / f"{contender}-{repeat}.log")
            runs[contender].append(read_run(contender, args, workdir, steps))
            print(f"# {contender} run {repeat + 1}: {time.perf_counter() - started:.0f} s wall, "
                  f"load average before {load:.2f}", flush=True)  # fmt: skip
    print_table(runs, steps, args, flops)
    (workdir / "result.json").write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
