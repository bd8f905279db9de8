"""Where a training step of ift-dist goes: a torch.profiler breakdown of ift_dist.train's own steps into attention,
matmuls, ZeRO-3 gathers/partitions, optimizer, loss, data, other ops and host gaps, in ms per step and %.

    python bench/profile_step.py --out runs/profile [--micro-batch-rows 8 --accumulation 1] [--model DIR]
        [--hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 8192 --max-length 4096
         --tokenizer ../shared/tokenizers/llama-3.1-instruct]

One process (a world of one, as `python -m ift_dist.train`), DeepSpeed ZeRO-3 from configs/ds_zero3/zero3.json, the
batches and config of bench/train_throughput.py (bf16 on CUDA, fp32 on CPU). It runs 1 + --warmup-steps +
--steps optimizer steps; the profiler records the last --steps of them, one profiler step per optimizer step (from
the end of one logged step to the end of the next: data, forward, backward, optimizer, logging). A model directory
named by --model is used when it has a config.json, else a random Llama of the given shape is written there.

How time is attributed. The run is annotated, without changing ift_dist, with torch.profiler regions: `ift::data`
(each batch taken from the loader), `ift::loss` (the fused loss head; with train.loss=reference the torch
cross-entropy, the logits matmul then counts as a matmul), `ift::zero3` (DeepSpeed's parameter fetch and release
around every module, its gradient reduce-and-partition) and `ift::optimizer` (DeepSpeed's ZeRO-3 optimizer step).
Every profiled op's own time (self time: its children's time goes to them) gets the category of the
highest-priority name among the op, the ops around it and the regions around those (CATEGORIES' order: an all-gather
inside the loss head counts as ZeRO-3, a matmul inside it as loss). Communication ops (all_gather, reduce_scatter,
NCCL/gloo) are ZeRO-3 wherever they run.
  CPU:  the categories are the self times of the ops of the training thread; "host gaps" is the step time when none
        of its ops runs (Python, DeepSpeed's bookkeeping): the rows add up to the step time.
  CUDA: the categories are GPU kernel (and memcpy/memset) times, each kernel counted for the op that launched it;
        "host gaps" is the step time when no kernel runs (the GPU idles: launch overhead, synchronisations, data);
        kernels on concurrent streams (NCCL beside compute) are counted in both categories and subtracted once as
        "overlap", so the rows add up to the step time. The host view (the CPU table) is written to the JSON too.
Writes OUT/trace.json (chrome://tracing, Perfetto) and OUT/breakdown.json, and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

# Highest priority first: a name of an earlier category anywhere around an op decides.
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("data", re.compile(r"^ift::data")),
    (
        "zero3",
        re.compile(
            r"^ift::zero3|all_gather|allgather|reduce_scatter|reducescatter|all_reduce|allreduce|broadcast"
            r"|^c10d::|^nccl|^gloo|record_param_comms",
            re.IGNORECASE,
        ),
    ),
    ("loss", re.compile(r"^ift::loss")),
    ("attention", re.compile(r"scaled_dot_product|attention|flash|^flex|varlen|fmha", re.IGNORECASE)),
    ("optimizer", re.compile(r"^ift::optimizer|^Optimizer\.|adamw?\b|_fused_adam", re.IGNORECASE)),
    (
        "matmul",
        re.compile(
            r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_addmm_activation|_scaled_mm)$|^(Mm|Addmm|Bmm)Backward"
            r"|gemm|cutlass|xmma|nvjet|cublas",
            re.IGNORECASE,
        ),
    ),
)
OTHER, GAPS, OVERLAP = "other ops", "host gaps", "overlap"
ROWS = (*(name for name, _ in CATEGORIES), OTHER, GAPS)
STEP_EVENT = re.compile(r"^ProfilerStep(#\d+|\*)$")  # torch names them ProfilerStep* in events()


def categorize(names: Sequence[str]) -> str:
    """The category of an op from its own name and those of the ops and regions around it (any order)."""
    for category, pattern in CATEGORIES:
        if any(pattern.search(name) for name in names):
            return category
    return OTHER


@dataclass(frozen=True)
class Record:
    """One profiled op (or kernel) inside the profiled steps: its interval, the time it counts for (self time of a
    CPU op, duration of a kernel) and the names that decide its category (its own first)."""

    start_us: float
    end_us: float
    own_us: float
    names: tuple[str, ...]


def union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def breakdown(records: Sequence[Record], windows: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Time per category over the step windows, in µs: the records' own time by category, "host gaps" (window time
    covered by no record) and "overlap" (time counted twice by records that run at once), so that the categories +
    host gaps - overlap = the windows' total. Records are clipped to the windows."""
    times = dict.fromkeys(ROWS, 0.0)
    covered = []
    for window_start, window_end in windows:
        intervals = []
        for record in records:
            start, end = max(record.start_us, window_start), min(record.end_us, window_end)
            if end <= start:  # outside this window (or of no duration)
                continue
            share = (end - start) / (
                record.end_us - record.start_us
            )  # a kernel across a step boundary: its part
            times[categorize(record.names)] += record.own_us * share
            intervals.append((start, end))
        covered.append(union_us(intervals))
    total = sum(end - start for start, end in windows)
    busy = sum(covered)
    times[GAPS] = total - busy
    counted = sum(value for key, value in times.items() if key != GAPS)
    return {"total_us": total, "steps": len(windows), "times_us": times, "overlap_us": counted - busy}


def table(result: dict[str, Any], title: str) -> str:
    """A markdown table of a breakdown: ms per step and share of the step time."""
    steps, total = result["steps"], result["total_us"]
    lines = [
        f"{title}: {steps} steps, {total / steps / 1e3:,.1f} ms per step",
        "",
        "| category | ms / step | % |",
    ]
    lines.append("|---|---:|---:|")
    rows = list(result["times_us"].items())
    if abs(result["overlap_us"]) > 0.005 * total:
        rows.append((f"{OVERLAP} (counted twice above)", -result["overlap_us"]))
    for name, value in rows:
        lines.append(f"| {name} | {value / steps / 1e3:,.2f} | {100 * value / total:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- from the profiler's events


def is_device(event: Any) -> bool:
    return str(getattr(event, "device_type", "")).endswith(("CUDA", "PrivateUse1", "XPU"))


def names_up(event: Any) -> list[str]:
    names = []
    while event is not None:
        if not STEP_EVENT.match(event.name):
            names.append(event.name)
        event = event.cpu_parent
    return names


def records_from(
    events: Sequence[Any],
) -> tuple[list[tuple[float, float]], list[Record], list[Record], float]:
    """(step windows, host records of the training thread, device records, other threads' op time in µs) from
    torch.profiler's FunctionEvents."""
    steps = [event for event in events if STEP_EVENT.match(event.name) and not is_device(event)]
    if not steps:
        raise RuntimeError("no ProfilerStep events: did the profiled run reach its profiled steps?")
    windows = sorted((event.time_range.start, event.time_range.end) for event in steps)
    thread = steps[0].thread
    host, device, other_threads = [], [], 0.0
    launchers = {}
    for event in events:
        if is_device(event) or STEP_EVENT.match(event.name):
            continue
        if getattr(event, "linked_correlation_id", 0) == 0:
            launchers[event.id] = event
        if event.thread != thread:
            other_threads += event.self_cpu_time_total
            continue
        host.append(Record(event.time_range.start, event.time_range.end, event.self_cpu_time_total,
                           tuple(names_up(event))))  # fmt: skip
    for event in events:
        if not is_device(event):
            continue
        launcher = launchers.get(getattr(event, "linked_correlation_id", 0))
        names = (event.name, *(names_up(launcher) if launcher is not None else ()))
        start, end = event.time_range.start, event.time_range.end
        device.append(Record(start, end, end - start, names))
    return windows, host, device, other_threads


# ---------------------------------------------------------------------------------------- annotating the train path


def annotate(function: Callable[..., Any], region: str) -> Callable[..., Any]:
    from torch.profiler import record_function

    @functools.wraps(function)
    def annotated(*args: Any, **kwargs: Any) -> Any:
        with record_function(region):
            return function(*args, **kwargs)

    return annotated


def annotate_train_path() -> list[str]:
    """Wrap the methods whose time is a category in profiler regions (class attributes, for this process only);
    returns the names of those not found (a DeepSpeed release that renamed them: their time then counts by op
    name only)."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator
    from deepspeed.runtime.zero import stage3
    from torch.profiler import record_function

    from ift_dist import loss
    from ift_dist.data import loader

    targets = [
        (coordinator.PartitionedParameterCoordinator, "fetch_sub_module", "ift::zero3 fetch"),
        (coordinator.PartitionedParameterCoordinator, "release_sub_module", "ift::zero3 release"),
        (stage3.DeepSpeedZeroOptimizer_Stage3, "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads",
         "ift::zero3 reduce grads"),
        (stage3.DeepSpeedZeroOptimizer_Stage3, "step", "ift::optimizer"),
        (loss.LinearLossHead, "forward", "ift::loss"),
        (loss, "reference_cross_entropy", "ift::loss"),
    ]  # fmt: skip
    missing = []
    for owner, name, region in targets:
        if hasattr(owner, name):
            setattr(owner, name, annotate(getattr(owner, name), region))
        else:
            missing.append(f"{getattr(owner, '__name__', owner)}.{name}")
    iterate = loader.PackedLoader.__iter__

    def batches(self: Any) -> Any:
        source = iterate(self)
        while True:
            with record_function("ift::data"):
                batch = next(source, None)
            if batch is None:
                return
            yield batch

    loader.PackedLoader.__iter__ = batches
    return missing


# ---------------------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from train_throughput import add_model_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for trace.json and breakdown.json")
    parser.add_argument(
        "--model", type=Path, help="HF model directory; written (a random Llama) when it has none"
    )
    add_model_arguments(parser)
    parser.add_argument("--max-length", type=int, default=512, help="tokens per packed row")
    parser.add_argument("--micro-batch-rows", type=int, default=1, help="packed rows per micro batch")
    parser.add_argument("--accumulation", type=int, default=1, help="micro batches per optimizer step")
    parser.add_argument("--steps", type=int, default=3, help="profiled optimizer steps")
    parser.add_argument(
        "--warmup-steps", type=int, default=1, help="steps after the first, run but not profiled"
    )
    parser.add_argument("--ift-override", action="append", default=[], help="extra key=value for ift-dist")
    parser.add_argument(
        "--data-workers", type=int, default=None, help="data.num_workers (default 0 CPU, 1 GPU)"
    )
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where CUDA is available")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    if not gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from torch.profiler import ProfilerActivity, profile, schedule
    from train_throughput import write_ift_config, write_model

    from ift_dist import metrics, train
    from ift_dist.data.render import load_tokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or args.out / "model"
    if not (model / "config.json").exists():
        write_model(args, load_tokenizer(args.tokenizer), model)
    steps = 1 + args.warmup_steps + args.steps
    config_args = argparse.Namespace(
        **{**vars(args), "ranks": 1, "steps": steps, "learning_rate": 3e-4, "pack_buffer": 128}
    )
    config_args.cpu = not gpu
    config = write_ift_config(config_args, model, args.out)
    missing = annotate_train_path()
    logged: list[dict[str, Any]] = []
    analysed: dict[str, Any] = {}

    def analyse(profiler: Any) -> None:
        profiler.export_chrome_trace(str(args.out / "trace.json"))
        windows, host, device, other_threads = records_from(profiler.events())
        analysed["host"] = breakdown(host, windows)
        analysed["host"]["other_threads_us"] = other_threads
        if gpu:
            analysed["device"] = breakdown(device, windows)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(
        activities=activities,
        schedule=schedule(wait=1, warmup=args.warmup_steps, active=args.steps, repeat=1),
        on_trace_ready=analyse,
    ) as profiler:
        log_step = metrics.RunLogger.step

        def profiled_step(self: Any, record: dict[str, Any]) -> None:
            log_step(self, record)
            logged.append(record)
            profiler.step()  # one profiler step per optimizer step

        metrics.RunLogger.step = profiled_step
        started = time.perf_counter()
        overrides = [f"output_dir={args.out / 'run'}", "export.at_end=false", *args.ift_override]
        code = train.main([str(config), *overrides])
        metrics.RunLogger.step = log_step
    if code != 0 or "host" not in analysed:
        print(f"training exited {code}; profiled: {sorted(analysed)}", file=sys.stderr)
        return 1
    profiled = logged[-args.steps :]
    summary = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "torch": torch.__version__,
        "model": str(model),
        "micro_batch_rows": args.micro_batch_rows,
        "accumulation": args.accumulation,
        "max_length": args.max_length,
        "overrides": args.ift_override,
        "regions_not_found": missing,
        "tokens_per_step": sum(record["tokens"] for record in profiled) / len(profiled),
        "step_seconds_logged": [record["step_seconds"] for record in profiled],
        "mfu_logged": [record["mfu"] for record in profiled],
        "memory_gb_logged": [record["memory_gb"] for record in profiled],
        "wall_seconds": time.perf_counter() - started,
        **analysed,
    }
    (args.out / "breakdown.json").write_text(json.dumps(summary, indent=1) + "\n")
    seconds = sum(summary["step_seconds_logged"]) / len(profiled)
    mfu = [value for value in summary["mfu_logged"] if value is not None]
    print(f"# {summary['device']}, torch {torch.__version__}; micro batch {args.micro_batch_rows} x "
          f"{args.accumulation} rows of {args.max_length}; {summary['tokens_per_step']:,.0f} tokens per step, "
          f"{summary['tokens_per_step'] / seconds:,.0f} tokens/s under the profiler"
          + (f", MFU {100 * sum(mfu) / len(mfu):.1f}%" if mfu else ""))  # fmt: skip
    if missing:
        print(f"# not annotated (renamed upstream?): {', '.join(missing)}")
    if gpu:
        print(table(analysed["device"], "GPU kernel time"))
        print()
    print(table(analysed["host"], "host (training thread)"))
    print(f"\n# {args.out / 'trace.json'}, {args.out / 'breakdown.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
