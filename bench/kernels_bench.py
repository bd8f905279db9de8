"""Benchmark CLI: forward+backward time and peak memory of each linear cross-entropy, one table per device.

    python bench/kernels_bench.py                    # CPU table, then the CUDA table when a GPU is present
    python bench/kernels_bench.py --devices cuda --repeats 20

Implementations side by side: ours (`fused_linear_cross_entropy`, automatic dispatch) followed by our explicit
variants (`kernels_measure.OURS`: each dW strategy, a larger chunk; `--ours-variants` picks them), plain torch
(F.cross_entropy(hidden @ weight.T)), torch's own chunked F.linear_cross_entropy when the installed torch has it, and
Liger-Kernel's fused linear cross-entropy (default bf16 accumulation, and with accum_dtype=fp32) when installed and on
CUDA. Ratios are printed against plain torch and against Liger (default). How time and memory are measured:
`kernels_measure.py`.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import subprocess
from typing import NamedTuple

import torch
from kernels_measure import IMPLS, OURS, Case, measure_here, measure_in_fresh_process


class Shape(NamedTuple):
    tokens: int
    hidden_size: int
    vocab_size: int
    dtype: str
    ignored: float  # fraction of labels set to the ignore index
    repeats: int | None = None  # timed runs for this shape; None: the command line's --repeats


# The variants that accompany "ours" unless --ours-variants says otherwise: the 3-matmul strategies. ("ours_vocab" is
# what "ours" runs for bf16 today; name it to measure it explicitly.)
DEFAULT_VARIANTS = ("ours_rows_inplace", "ours_rows_inplace_x4", "ours_rows")

CPU_GRID = [
    Shape(2048, 512, 8000, "float32", 0.0),
    Shape(2048, 512, 8000, "float32", 0.5),
    # The memory goal's shape: ~35 s per forward+backward on one core, so it is timed once after the warm-up.
    Shape(8192, 1024, 32000, "float32", 0.0, repeats=1),
]
CUDA_GRID = [
    Shape(tokens, hidden_size, vocab_size, "bfloat16", ignored)
    for tokens, hidden_size, vocab_size, ignored in itertools.product(
        (8192, 32768), (2048, 4096), (32000, 128256, 151936), (0.0, 0.5)
    )
]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in output.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def _cell(result: dict, key: str, baseline: dict | None, digits: int) -> tuple[str, str]:
    if result["status"] != "ok":
        return result["status"], ""
    value = result[key]
    ratio = ""
    if baseline and baseline.get("status") == "ok" and baseline[key] > 0:
        ratio = f"{value / baseline[key]:.3f}"
    return f"{value:.{digits}f}", ratio


def run_device(device: str, grid, impls, warmup: int, repeats: int, threads: int) -> list[str]:
    """Measures every (shape, implementation) of the grid on `device`; returns the table as Markdown lines."""
    lines = [
        f"Device: {device_name(device)} ({device}, torch {torch.__version__}, {threads} thread(s))"
        if device == "cpu"
        else f"Device: {device_name(device)} ({device}, torch {torch.__version__})",
        "",
        "| N | H | V | dtype | ignored | impl | time ms | x torch | x liger | peak MiB | x torch | x liger |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    all_results = {}
    print("\n".join(lines), flush=True)
    for tokens, hidden_size, vocab_size, dtype, ignored, shape_repeats in grid:
        results = {}
        for impl in impls:
            case = Case(
                tokens,
                hidden_size,
                vocab_size,
                dtype,
                ignored,
                impl,
                device,
                warmup,
                shape_repeats or repeats,
                threads,
            )
            results[impl] = measure_in_fresh_process(case) if device == "cpu" else measure_here(case)
        all_results[tokens, hidden_size, vocab_size, dtype, ignored] = results
        for impl in impls:
            time_ms, time_ratio = _cell(results[impl], "time_ms", results.get("torch"), 1)
            _, time_liger = _cell(results[impl], "time_ms", results.get("liger"), 1)
            peak, peak_ratio = _cell(results[impl], "peak_mib", results.get("torch"), 1)
            _, peak_liger = _cell(results[impl], "peak_mib", results.get("liger"), 1)
            line = (
                f"| {tokens} | {hidden_size} | {vocab_size} | {dtype} | {ignored:.0%} | {impl} "
                f"| {time_ms} | {time_ratio} | {time_liger} | {peak} | {peak_ratio} | {peak_liger} |"
            )
            lines.append(line)
            print(line, flush=True)
    ignored_lines = _ignored_speedup(all_results, impls)
    print("\n".join(ignored_lines), flush=True)
    return lines + ignored_lines


def _ignored_speedup(all_results: dict, impls) -> list[str]:
    """Time with some labels ignored over the time of the same shape fully supervised, where the grid has both."""
    lines = []
    for (tokens, hidden_size, vocab_size, dtype, ignored), results in all_results.items():
        supervised = all_results.get((tokens, hidden_size, vocab_size, dtype, 0.0))
        if ignored == 0.0 or supervised is None:
            continue
        if not lines:
            lines = [
                "",
                "| N | H | V | dtype | ignored | impl | time x all supervised |",
                "|---|---|---|---|---|---|---|",
            ]
        for impl in impls:
            _, ratio = _cell(results[impl], "time_ms", supervised[impl], 1)
            lines.append(
                f"| {tokens} | {hidden_size} | {vocab_size} | {dtype} | {ignored:.0%} | {impl} | {ratio} |"
            )
    return lines


def expand_impls(impls: list[str], ours_variants: list[str]) -> list[str]:
    """The implementations to measure, in order: each of `impls`, with `ours_variants` right after "ours"."""
    expanded = []
    for impl in impls:
        for name in [impl, *ours_variants] if impl == "ours" else [impl]:
            if name not in expanded:
                expanded.append(name)
    return expanded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--devices", nargs="+", choices=("cpu", "cuda"), help="default: cpu, and cuda if present"
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=["ours", "torch", "torch_fused", "liger", "liger_fp32_accum"],
    )
    parser.add_argument(
        "--ours-variants",
        nargs="*",
        choices=[name for name in OURS if name != "ours"],
        default=list(DEFAULT_VARIANTS),
        help="our explicit variants measured right after 'ours' (none: the automatic dispatch alone)",
    )
    parser.add_argument("--warmup", type=int, help="runs before timing (default: 1 on CPU, 3 on CUDA)")
    parser.add_argument(
        "--repeats", type=int, help="timed runs, median reported (default: 3 on CPU, 10 on CUDA)"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per measurement")
    parser.add_argument(
        "--shape",
        action="append",
        metavar="N,H,V,DTYPE,IGNORED",
        help="measure this shape instead of the device's default grid (repeatable)",
    )
    args = parser.parse_args(argv)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    custom_grid = None
    if args.shape:
        custom_grid = []
        for text in args.shape:
            tokens, hidden_size, vocab_size, dtype, ignored = text.split(",")
            custom_grid.append(Shape(int(tokens), int(hidden_size), int(vocab_size), dtype, float(ignored)))
    print(f"# fused linear cross-entropy benchmark, {datetime.date.today().isoformat()}")
    print(
        "# time: median of forward+backward; peak: memory above inputs and outputs (see bench/kernels_measure.py)"
    )
    for device in devices:
        grid = custom_grid or (CPU_GRID if device == "cpu" else CUDA_GRID)
        warmup = args.warmup or (1 if device == "cpu" else 3)
        repeats = args.repeats or (3 if device == "cpu" else 10)
        print()
        run_device(device, grid, expand_impls(args.impls, args.ours_variants), warmup, repeats, args.threads)


if __name__ == "__main__":
    main()
