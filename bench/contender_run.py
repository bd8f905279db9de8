"""One run of one contender of bench/train_throughput.py at one batch geometry (rows per micro batch, accumulation,
steps): its inputs written to a directory, its ranks launched under `deepspeed`, how the run ended and what it measured.

    steps = prepare(args, model, tokenizer, directory, gpu)     # ift.yaml, batches.json, steps.json, setup.json
    result = run_contender("ift", args, directory, steps, log)  # {"status": "ok", measurements} or why it failed
    numbers = summarize([result], steps, args, flops)           # tokens/s, tokens per CPU-s, peak memory, MFU

A run that fails is an outcome to report, not an exception: classify_run reads the launcher's exit code and the log of
all ranks (Outcome "ok" | "oom" | "failed" | "timeout"). A contender that runs out of memory is a result (the table
says "OOM"), not a reason to abort the other contenders.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONTENDERS = ("ift", "ift_reference", "hf_padded", "hf_flat", "ift_lora", "hf_lora")
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

# Lines that mean a rank ran out of memory: torch's CUDA allocator, the CPU allocator, NCCL/cuBLAS allocations.
OOM_PATTERNS = (
    re.compile(r"OutOfMemoryError"),
    re.compile(r"CUDA out of memory", re.IGNORECASE),
    re.compile(r"CUBLAS_STATUS_ALLOC_FAILED"),
    re.compile(r"DefaultCPUAllocator: can't allocate memory"),
    re.compile(r"NCCL.*(out of memory|Failed to CUDA calloc)", re.IGNORECASE),
)
# The deepspeed launcher's line for a rank that ended by a signal ("exits with return code = -9"): SIGKILL is what the
# kernel's out-of-memory killer sends, so a killed rank counts as out of memory (host memory).
KILLED = re.compile(r"return code = -(\d+)")
ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b")  # "torch.x.FooError: why"
RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s*")  # torch's prefix of every line a rank prints to stderr
STATUSES = ("ok", "oom", "failed", "timeout")


@dataclass(frozen=True)
class Outcome:
    """How one run of one contender ended. `detail`: the line that shows why (empty when ok)."""

    status: str  # one of STATUSES
    detail: str = ""

    @property
    def fits(self) -> bool:
        return self.status == "ok"

    def cell(self) -> str:
        """The table cell of a run without numbers: "OOM" or "failed: <the error line>"."""
        if self.status == "oom":
            return "OOM"
        if self.status == "timeout":
            return "timeout"
        return f"failed: {self.detail}".replace("|", "/")[:160]


def classify_run(code: int | str, log_text: str) -> Outcome:
    """The outcome of a run that exited with `code` ("timeout" when it was killed for running too long) and wrote
    `log_text` (all ranks' output). Out of memory wins over every other reading: a rank that hit it takes its peers
    down with collective errors afterwards, and those lines come last."""
    if code == "timeout":
        return Outcome("timeout", "")
    lines = [RANK_PREFIX.sub("", line.strip()) for line in log_text.splitlines() if line.strip()]
    for line in lines:
        if any(pattern.search(line) for pattern in OOM_PATTERNS):
            return Outcome("oom", line[:300])
    killed = next(
        (line for line in lines if (m := KILLED.search(line)) and int(m.group(1)) == signal.SIGKILL), None
    )
    if killed is not None or code in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return Outcome("oom", killed or f"killed (exit {code}): out of host memory?")
    if code == 0:
        return Outcome("ok")
    errors = [line for line in lines if ERROR_LINE.match(line)]
    detail = errors[-1] if errors else (lines[-1] if lines else f"exit {code}, no output")
    return Outcome("failed", detail[:300])


def on_gpu(args: argparse.Namespace) -> bool:
    return torch.cuda.is_available() and not args.cpu


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
