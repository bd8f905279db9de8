"""Benchmark CLI: time and peak memory of each packed-attention backend on the same packed rows, after checking it.

    python bench/attention_bench.py                       # CUDA if present: bf16, rows of 4096, the 1.24B Llama's heads
    python bench/attention_bench.py --device cpu --max-length 128 --batch 2 --heads 4 --kv-heads 2 --head-dim 16 \\
        --lengths lognormal:24,0.8                        # a tiny CPU run (fp32)

Rows: sample lengths drawn (seeded) from a real chat mix, by default the llama-3.1 chat-template token counts of a few
hundred records of LLaMA-Factory's Alpaca, Glaive tool-calling and KTO demos in ../shared/data (or a log-normal mix,
`--lengths lognormal:MEDIAN,SIGMA`), clipped to --max-length and laid end to end greedily: a row takes the next drawn
sample while it fits, else the row is closed (the rest is padding, its own segment) and the sample opens the next row.
Every backend gets the boundaries as a model call would (`packed_forward_kwargs` -> PackedSegments) and runs through
the function registered with transformers' AttentionInterface, on q/k/v laid out as the projections make them.

Correctness first: each backend's output and q/k/v gradients are compared with sdpa and its block-diagonal mask in
fp32 (the reference); a max abs difference above TOLERANCE[dtype] x max(1, max |reference|) in any of these four
tensors marks it WRONG, and a WRONG or failing backend is never timed nor fastest. Then per backend: the median of
--repeats calls after --warmup (CUDA events on GPU) of the forward ("fwd") and of forward+backward ("fwd+bwd"), with
the segments' masks cached, as all layers of a step share them; "setup" is what building them costs once per step
(fresh segments + one forward, minus a cached forward). "step" = --layers x fwd+bwd + setup ranks the backends
("ratio": step / the fastest correct step). Peak memory (CUDA only) = max_memory_allocated during one forward+backward
with fresh segments, above what was allocated before it (the inputs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from ift_dist.attention import BACKENDS, backend_available, packed_forward_kwargs, select_backend  # noqa: E402
from ift_dist.attention_functions import register_attention_functions  # noqa: E402
from ift_dist.data.contracts import PackedBatch  # noqa: E402

CHAT_FILES = (
    "data/llamafactory/alpaca_en_demo.json",
    "data/llamafactory/glaive_toolcall_en_demo.json",
    "data/llamafactory/kto_en_demo.json",
)
# Max abs difference allowed, relative to max(1, max |reference|) of each tensor: the dtype's rounding over a softmax.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
AttentionFunction = Callable[..., tuple[torch.Tensor, Any]]


@dataclass
class Contender:
    name: str
    function: AttentionFunction  # transformers' attention-function signature
    segments_for: str  # the backend whose PackedSegments it is given


@dataclass
class Result:
    backend: str
    status: str  # ok, WRONG, skipped, failed
    detail: str = ""
    out_diff: float | None = None  # max abs difference of the output vs the reference
    grad_diff: float | None = None  # max abs difference of the q/k/v gradients vs the reference
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    setup_ms: float | None = None
    step_ms: float | None = None
    ratio: float | None = None  # step_ms / the fastest correct step_ms
    peak_mib: float | None = None


# ------------------------------------------------------------------------------------------------ rows


def chat_lengths(tokenizer_path: Path, records: int, seed: int, shared: Path = SHARED) -> list[int]:
    """Chat-template token counts of `records` records, a seeded equal share from each of CHAT_FILES."""
    from ift_dist.config.data_schema import SourceConfig
    from ift_dist.data.contracts import SampleRef
    from ift_dist.data.records import detect_format, to_conversation
    from ift_dist.data.render import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_path))
    generator = random.Random(seed)
    lengths = []
    for relative in CHAT_FILES:
        file = shared / relative
        rows = json.loads(file.read_text())
        for index in generator.sample(range(len(rows)), min(len(rows), records // len(CHAT_FILES))):
            record = rows[index]
            conversation = to_conversation(
                record, fmt=detect_format(record) or "alpaca", source=SourceConfig(path=str(file)),
                ref=SampleRef(file.stem, index), file=str(file), location=str(index),
            )  # fmt: skip
            if not hasattr(conversation, "messages"):
                continue  # a record the adapters reject (e.g. no assistant turn)
            messages = [{k: v for k, v in asdict(m).items() if v is not None} for m in conversation.messages]
            ids = tokenizer.apply_chat_template(messages, tools=conversation.tools, tokenize=True)
            lengths.append(len(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return lengths


def lognormal_lengths(median: float, sigma: float, count: int, seed: int) -> list[int]:
    generator = random.Random(seed)
    return [max(1, round(generator.lognormvariate(math.log(median), sigma))) for _ in range(count)]


def pack_rows(pool: list[int], max_length: int, rows: int, seed: int) -> list[list[int]]:
    """`rows` rows of sample lengths drawn with replacement from `pool` (clipped to max_length), greedily end to
    end: a sample that does not fit closes the row and opens the next."""
    generator = random.Random(seed)
    packed: list[list[int]] = [[]]
    while True:
        length = min(generator.choice(pool), max_length)
        if sum(packed[-1]) + length > max_length:
            if len(packed) == rows:
                return packed
            packed.append([])
        packed[-1].append(length)


def packed_batch(seq_lens: list[list[int]], max_length: int) -> PackedBatch:
    position_ids = torch.zeros(len(seq_lens), max_length, dtype=torch.long)
    for row, lengths in enumerate(seq_lens):
        start = 0
        for length in lengths:
            position_ids[row, start : start + length] = torch.arange(length)
            start += length
    ids = torch.zeros_like(position_ids)
    return PackedBatch(ids, ids.clone(), position_ids, seq_lens, [[] for _ in seq_lens])


# ------------------------------------------------------------------------------------------------ calling


class _Attention(torch.nn.Module):
    """What the attention functions read from the calling layer."""

    is_causal = True


LAYER = _Attention()


def make_inputs(batch: int, length: int, heads: int, kv_heads: int, head_dim: int, dtype, device, seed: int):
    """q, k, v leaves in the projections' layout [B, T, H, D] and the upstream gradient of the output [B, T, H, D]."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype).requires_grad_()

    query = normal(batch, length, heads, head_dim)
    key, value = normal(batch, length, kv_heads, head_dim), normal(batch, length, kv_heads, head_dim)
    return query, key, value, normal(batch, length, heads, head_dim).detach()


def run(contender: Contender, inputs, batch: PackedBatch, segments=None, backward: bool = True):
    """One call as a model layer makes it: q/k/v as [B, H, T, D] views. Returns (output [B, T, H, D], segments)."""
    query, key, value, grad_out = inputs
    if segments is None:
        segments = packed_forward_kwargs(batch, contender.segments_for, query.device)["packed_segments"]
    for leaf in (query, key, value):
        leaf.grad = None
    with torch.set_grad_enabled(backward):
        out, _ = contender.function(
            LAYER, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), None,
            dropout=0.0, scaling=query.shape[-1] ** -0.5, packed_segments=segments,
        )  # fmt: skip
        if backward:
            out.backward(grad_out)
    return out, segments


def registered_contenders() -> list[Contender]:
    from transformers import AttentionInterface

    interface = AttentionInterface()
    return [Contender(b, interface[name], b) for b, name in register_attention_functions().items()]


# ------------------------------------------------------------------------------------------------ measuring


def check(contenders: list[Contender], inputs, batch: PackedBatch, dtype) -> list[Result]:
    """Output and gradients of each contender vs sdpa in fp32 on the same rows; WRONG beyond TOLERANCE[dtype]."""
    sdpa = next(c for c in registered_contenders() if c.name == "sdpa")
    reference_inputs = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
    reference_out, _ = run(sdpa, reference_inputs, batch)
    reference_grads = [t.grad for t in reference_inputs[:3]]
    references = [reference_out, *reference_grads]
    results = []
    for contender in contenders:
        try:
            out, _ = run(contender, inputs, batch)
        except Exception as error:  # a backend that cannot run these rows is a row of the table, not the end
            results.append(Result(contender.name, "failed", f"{type(error).__name__}: {error}"[:200]))
            continue
        out_diff = (out.float() - reference_out).abs().max().item()
        grad_diffs = [
            (t.grad.float() - g).abs().max().item() for t, g in zip(inputs[:3], reference_grads, strict=True)
        ]
        # Each tensor against its own magnitude: gradients of keys many queries attend to grow with the sample.
        relative = [
            d / max(1.0, r.abs().max().item())
            for d, r in zip([out_diff, *grad_diffs], references, strict=True)
        ]
        wrong = not max(relative) <= TOLERANCE[dtype]  # NaN is wrong too
        detail = f"max diff {max(relative):.2g} of the reference's magnitude" if wrong else ""
        results.append(Result(contender.name, "WRONG" if wrong else "ok", detail, out_diff, max(grad_diffs)))
    return results


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(call: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            call()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def measure(result: Result, contender: Contender, inputs, batch: PackedBatch, args) -> None:
    device = inputs[0].device
    _, segments = run(contender, inputs, batch)  # masks built and cached, kernels compiled
    result.fwd_ms = median_ms(
        lambda: run(contender, inputs, batch, segments, False), device, args.warmup, args.repeats
    )
    result.fwd_bwd_ms = median_ms(
        lambda: run(contender, inputs, batch, segments), device, args.warmup, args.repeats
    )
    # Few fresh calls: were a new BlockMask to trigger a torch.compile recompilation, each would cost seconds.
    fresh_ms = median_ms(lambda: run(contender, inputs, batch, None, False), device, 1, min(3, args.repeats))
    result.setup_ms = max(0.0, fresh_ms - result.fwd_ms)
    result.step_ms = args.layers * result.fwd_bwd_ms + result.setup_ms
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        for leaf in inputs[:3]:
            leaf.grad = None
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run(contender, inputs, batch)
        sync(device)
        result.peak_mib = (torch.cuda.max_memory_allocated(device) - before) / 2**20


def bench(contenders: list[Contender], inputs, batch: PackedBatch, dtype, args) -> list[Result]:
    """Check every contender, then time the ones that agree; `ratio` against the fastest correct."""
    results = check(contenders, inputs, batch, dtype)
    for result, contender in zip(results, contenders, strict=True):
        if result.status == "ok":
            try:
                measure(result, contender, inputs, batch, args)
            except Exception as error:
                result.status, result.detail = "failed", f"{type(error).__name__}: {error}"[:200]
                result.step_ms = None
    timed = [r.step_ms for r in results if r.status == "ok" and r.step_ms is not None]
    for result in results:
        if result.step_ms is not None and timed:
            result.ratio = result.step_ms / min(timed)
    return results


def fastest_correct(results: list[Result]) -> str | None:
    correct = [r for r in results if r.status == "ok" and r.step_ms is not None]
    return min(correct, key=lambda r: r.step_ms).backend if correct else None


def auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    """What `select_backend(model, "auto")` picks today for a Llama in `dtype` on `device`, training."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    return select_backend(LlamaForCausalLM(config).to(dtype), "auto", device=device, training=True)


# ------------------------------------------------------------------------------------------------ reporting


def table(results: list[Result], header: dict[str, Any]) -> str:
    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"# {key}: {value}" for key, value in header.items()]
    columns = ("backend", "status", "fwd ms", "fwd+bwd ms", "setup ms", "step ms", "ratio", "peak MiB",
               "out diff", "grad diff")  # fmt: skip
    # Markdown rows (leading and trailing |): docs/benchmarks.md takes them as they are, gpu_check's summary keeps them.
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in results:
        peak = "n/a" if r.peak_mib is None and r.status == "ok" else number(r.peak_mib, 1)
        cells = (r.backend, r.status, number(r.fwd_ms, 3), number(r.fwd_bwd_ms, 3), number(r.setup_ms, 3),
                 number(r.step_ms, 2), number(r.ratio, 2), peak,
                 "-" if r.out_diff is None else f"{r.out_diff:.2e}",
                 "-" if r.grad_diff is None else f"{r.grad_diff:.2e}")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |" + (f"  ({r.detail})" if r.detail else ""))
    lines.append(f"# fastest correct: {fastest_correct(results)}")
    lines.append(f"# auto picks today: {header.get('auto')}")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "CPU")
    return f"{model} ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--max-length", type=int, default=4096, help="tokens per packed row")
    parser.add_argument("--batch", type=int, default=2, help="packed rows")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument(
        "--layers", type=int, default=16, help="attention calls per step, for the step column"
    )
    parser.add_argument("--lengths", default="chat", help="chat, or lognormal:MEDIAN,SIGMA")
    parser.add_argument("--records", type=int, default=300, help="chat records tokenized for the length mix")
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers/llama-3.1-instruct"))
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated; unavailable ones skipped"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write header and rows here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.lengths == "chat":
        pool = chat_lengths(Path(args.tokenizer), args.records, args.seed)
    else:
        median, sigma = (float(x) for x in args.lengths.removeprefix("lognormal:").split(","))
        pool = lognormal_lengths(median, sigma, args.records, args.seed)
    seq_lens = pack_rows(pool, args.max_length, args.batch, args.seed)
    batch = packed_batch(seq_lens, args.max_length)
    inputs = make_inputs(args.batch, args.max_length, args.heads, args.kv_heads, args.head_dim, dtype, device,
                         args.seed)  # fmt: skip

    contenders, skipped = [], []
    for contender in registered_contenders():
        if contender.name not in args.backends.split(","):
            continue
        reason = backend_available(contender.name, device.type, dtype, training=True)
        if reason is None:
            contenders.append(contender)
        else:
            skipped.append(Result(contender.name, "skipped", reason))
    results = bench(contenders, inputs, batch, dtype, args) + skipped

    header = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": f"batch {args.batch} x {args.max_length} tokens, {args.heads} heads / {args.kv_heads} kv heads "
        f"x {args.head_dim}, {args.layers} layers per step",
        "lengths": f"{args.lengths}: pool of {len(pool)}, median {statistics.median(pool):.0f}, max {max(pool)}",
        "samples per row": [len(row) for row in seq_lens],
        "auto": auto_backend(device, dtype),
    }
    print(table(results, header))
    if args.json is not None:
        payload = {"header": header, "seq_lens": seq_lens, "fastest_correct": fastest_correct(results),
                   "rows": [asdict(r) for r in results]}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
