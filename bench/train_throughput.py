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
result.json; --report-only prints its table again.

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
from micro_batch_search import Outcome, classify_run, largest_fitting

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


def launch(contender: str, args: argparse.Namespace, workdir: Path, log: Path) -> Outcome:
    """`deepspeed --num_gpus N bench/train_throughput_rank.py`; on a timeout the whole process group is killed.
    A run that fails (out of memory, an error, the timeout) is an outcome to report, not an exception."""
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

        def stop_ranks(signum: int, frame: Any) -> None:  # the bench itself is stopped (`timeout`, Ctrl-C)
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the ranks would outlive the bench
            raise SystemExit(128 + signum)

        handlers = {number: signal.signal(number, stop_ranks) for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = "timeout"
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
    # DeepSpeed's CPU shared-memory allreduce leaves a 66 MB segment per rank in /dev/shm, named after the port
    # (ift-dist unlinks its own in engine.init_distributed; the Trainer contenders do not). The ranks are gone now.
    for segment in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        segment.unlink(missing_ok=True)
    outcome = classify_run(code, log.read_text(errors="replace"))
    if not outcome.fits:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        logger.warning("%s: %s (exit %s); log %s, its end:\n%s", contender, outcome.cell(), code, log, tail)
    return outcome


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


def summarize(
    results: list[dict], steps: list[dict], args: argparse.Namespace, flops: Any
) -> dict[str, Any] | None:
    """The numbers of one contender over its successful runs (None when none succeeded). "tokens/s": the median
    over the timed steps of every run of the step's real tokens / its wall time. "tokens per CPU-s": the same over
    the CPU time of all ranks, the work a step costs: on a machine shared with other jobs it is not inflated by
    waiting for a core, as wall time is."""
    from ift_dist.metrics import peak_flops

    results = [result for result in results if result.get("status", "ok") == "ok"]
    if not results:
        return None
    first = args.warmup_steps
    peak = peak_flops(torch.device("cuda")) if on_gpu(args) else None

    def per_step(key: str) -> list[tuple[int, float]]:
        return [(first + step, seconds) for result in results for step, seconds in enumerate(result[key])]

    wall, cpu = per_step("step_seconds"), per_step("step_cpu_seconds")
    mfu = None
    if peak:
        mfu = statistics.median(
            flops.flops(steps[k]["lengths"]) / (seconds * args.ranks * peak) for k, seconds in wall
        )
    return {
        "tokens_per_second": statistics.median(steps[k]["tokens"] / seconds for k, seconds in wall),
        "tokens_per_cpu_second": statistics.median(steps[k]["tokens"] / seconds for k, seconds in cpu),
        "peak_memory_gb": max(max(result["peak_memory_gb"]) for result in results),
        "mfu": mfu,
        "losses": results[0]["losses"],
    }


def failure_cell(results: list[dict]) -> str:
    """The table cell of a contender none of whose runs succeeded: its first run's outcome."""
    first = results[0]
    return Outcome(first["status"], first.get("detail", "")).cell()


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


def run_contender(
    contender: str, args: argparse.Namespace, workdir: Path, steps: list[dict], log: Path
) -> dict[str, Any]:
    """One run: its measurements with status "ok", or {"status": "oom" | "failed" | "timeout", "detail": ...}."""
    outcome = launch(contender, args, workdir, log)
    if outcome.fits:
        try:
            return {"status": "ok", **read_run(contender, args, workdir, steps)}
        except (OSError, ValueError, KeyError, RuntimeError) as error:  # a rank file missing or short
            outcome = Outcome("failed", str(error).splitlines()[0])
    return {"status": outcome.status, "detail": outcome.detail}


def prepare(args: argparse.Namespace, model: Path, tokenizer: Any, directory: Path, gpu: bool) -> list[dict]:
    """The ift-dist config, the micro batches of every contender and setup.json of one batch geometry (args'
    micro_batch_rows, accumulation, steps) in `directory`, which the rank processes read; returns the steps."""
    from ift_dist.data.render import pad_token_id

    directory.mkdir(parents=True, exist_ok=True)
    config_path = write_ift_config(args, model, directory)
    items, steps = the_batches(config_path, args, tokenizer)
    (directory / "batches.json").write_text(json.dumps(items))
    (directory / "steps.json").write_text(json.dumps(steps))
    setup = {
        "model": str(model),
        "dtype": "bfloat16" if gpu else "float32",
        "zero_config": str(REPO / "configs/ds_zero3/zero3.json"),
        "accumulation_steps": args.accumulation,
        "micro_batch_rows": args.micro_batch_rows,
        "steps": args.steps,
        "learning_rate": args.learning_rate,
        "fused_adamw": gpu,  # what ift-dist's engine.build_optimizer picks
        "hf_attention": args.hf_attention,
        "pad_id": int(pad_token_id(tokenizer)),
        "seed": args.seed,
        "ift_overrides": args.ift_override,
    }
    (directory / "setup.json").write_text(json.dumps(setup, indent=1))
    return steps


def search_starts(text: str, contenders: list[str]) -> dict[str, int]:
    """--search-start: one number for every contender, or NAME=N pairs (the others start at 1)."""
    if "=" not in text:
        return dict.fromkeys(contenders, int(text))
    starts = dict.fromkeys(contenders, 1)
    for pair in text.split(","):
        name, value = pair.split("=")
        if name.strip() not in starts:
            raise SystemExit(f"--search-start names {name.strip()!r}, not one of the contenders {contenders}")
        starts[name.strip()] = int(value)
    return starts


def search(
    contenders: list[str], args: argparse.Namespace, workdir: Path, model: Path, tokenizer: Any, gpu: bool,
    flops: Any,
) -> dict[str, Any]:  # fmt: skip
    """--search-micro-batch: each contender's largest micro batch (rows per rank) that fits, by doubling then
    bisecting (micro_batch_search.largest_fitting), each probe a run of --steps steps; prints one line per probe as
    it ends and the table at the end, and writes search.json."""
    geometries: dict[int, list[dict]] = {}  # micro batch -> its steps, prepared once for every contender
    report: dict[str, Any] = {}
    starts = search_starts(args.search_start, contenders)
    deadline = time.perf_counter() + args.search_deadline_s if args.search_deadline_s else None

    class DeadlineReached(Exception):
        """--search-deadline-s passed: no further probe starts."""

    def probe_in(contender: str) -> Any:
        def probe(micro_batch: int) -> Outcome:
            if deadline is not None and time.perf_counter() > deadline:
                raise DeadlineReached
            geometry = argparse.Namespace(**{**vars(args), "micro_batch_rows": micro_batch})
            directory = workdir / f"micro{micro_batch}"
            if micro_batch not in geometries:
                geometries[micro_batch] = prepare(geometry, model, tokenizer, directory, gpu)
            steps = geometries[micro_batch]
            started = time.perf_counter()
            result = run_contender(contender, geometry, directory, steps, directory / f"{contender}.log")
            numbers = summarize([result], steps, geometry, flops)
            report[contender]["probes"][micro_batch] = {**result, "summary": numbers}
            shown = f"{numbers['tokens_per_second']:,.0f} tokens/s, {numbers['peak_memory_gb']:.1f} GiB" if numbers \
                else failure_cell([result])  # fmt: skip
            print(f"# probe {contender} micro batch {micro_batch}: {shown} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
            (workdir / "search.json").write_text(json.dumps(report, indent=1, default=str))
            return Outcome(result["status"], result.get("detail", ""))

        return probe

    for contender in contenders:
        report[contender] = {"probes": {}}
        try:
            best, _ = largest_fitting(
                probe_in(contender), start=min(starts[contender], args.search_max), limit=args.search_max,
                tolerance=args.search_tolerance,
            )  # fmt: skip
        except DeadlineReached:  # the largest that fitted so far: a lower bound
            fitted = [
                int(micro) for micro, probe in report[contender]["probes"].items() if probe["status"] == "ok"
            ]
            best = max(fitted, default=None)
            report[contender]["stopped"] = "deadline"
        report[contender]["largest"] = best
    (workdir / "search.json").write_text(json.dumps(report, indent=1, default=str))
    print_search_table(report, args)
    return report


def print_search_table(report: dict[str, Any], args: argparse.Namespace) -> None:
    """One row per contender: the largest micro batch that fits, its numbers, and the fastest micro batch probed."""
    print(
        f"| contender | largest micro batch (rows/rank, x{args.accumulation} accumulation) | tokens/s | "
        "peak memory / rank GiB | MFU | fastest probe: tokens/s (micro batch) | probes |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for contender, found in report.items():
        probes = {int(micro): probe for micro, probe in found["probes"].items()}
        shown = ", ".join(
            f"{micro} {'ok' if probe['summary'] else failure_cell([probe])}"
            for micro, probe in sorted(probes.items())
        )
        largest = found.get("largest")
        if found.get("stopped"):
            stopped = (
                f"search stopped at --search-deadline-s{', largest is a lower bound' if largest else ''}"
            )
            shown = f"{shown}; {stopped}" if shown else stopped
        if largest is None:
            print(f"| {NAMES[contender]} | {'not found' if found.get('stopped') else 'none fits'} | - | - | - | - "
                  f"| {shown or 'not probed'} |")  # fmt: skip
            continue
        numbers = probes[largest]["summary"]
        fastest = max(
            (micro for micro, probe in probes.items() if probe["summary"]),
            key=lambda micro: probes[micro]["summary"]["tokens_per_second"],
        )
        mfu = f"{100 * numbers['mfu']:.1f}%" if numbers["mfu"] is not None else "n/a"
        print(
            f"| {NAMES[contender]} | {largest} | {numbers['tokens_per_second']:,.0f} | "
            f"{numbers['peak_memory_gb']:.2f} | {mfu} | "
            f"{probes[fastest]['summary']['tokens_per_second']:,.0f} ({fastest}) | {shown} |"
        )


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
