"""bench/profile_step.py: the attribution of profiled time to categories (pure functions, on made-up events: a CPU
step and a GPU step with concurrent streams) and one real profiled CPU run of ift_dist.train on a tiny Llama whose
categories add up to the step time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from shared_paths import REPO, TOKENIZERS

sys.path.insert(0, str(REPO / "bench"))  # bench/ holds scripts, not a package

from profile_step import GAPS, OTHER, Record, breakdown, categorize, union_us

CPU_ROWS = (
    "data",
    "zero3",
    "loss",
    "attention",
    "optimizer",
    "matmul",
    OTHER,
    GAPS,
)  # the table's rows, in order


@pytest.mark.parametrize(
    ("names", "category"),
    [
        (("aten::mm", "aten::linear"), "matmul"),
        (("aten::mm", "ift::loss"), "loss"),  # the loss head's matmuls are the loss
        (
            ("gloo:all_gather", "ift::zero3 fetch", "ift::loss"),
            "zero3",
        ),  # the LM head's gather inside the loss
        (("aten::empty", "ift::zero3 release"), "zero3"),
        (("aten::bmm", "aten::_scaled_dot_product_attention_math"), "attention"),
        (("ScaledDotProductFlashAttentionForCpuBackward0",), "attention"),
        (("aten::addcdiv_", "Optimizer.step#AdamW.step", "ift::optimizer"), "optimizer"),
        (("c10d::allreduce_", "ift::optimizer"), "zero3"),  # the gradient norm's all-reduce
        (("aten::cat", "ift::data"), "data"),
        (("sm90_xmma_gemm_bf16bf16_bf16f32", "aten::mm", "aten::linear"), "matmul"),
        (("ncclDevKernel_AllGather_RING_LL", "nccl:_all_gather_base"), "zero3"),
        (("aten::mul", "aten::silu"), OTHER),
        (("MmBackward0",), "matmul"),
    ],
)
def test_categories_by_priority(names, category):
    assert categorize(names) == category


def test_union_of_intervals():
    assert union_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert union_us([]) == 0


def test_cpu_step_adds_up_with_host_gaps():
    """Nested ops on one thread: self times add up to the covered time; the rest of the window is host gaps."""
    records = [
        Record(0, 40, 10, ("aten::linear",)),  # self 10 = 40 - its child's 30
        Record(5, 35, 30, ("aten::addmm", "aten::linear")),
        Record(50, 60, 10, ("aten::_flash_attention_forward",)),
        Record(70, 90, 20, ("ift::data",)),
    ]
    result = breakdown(records, [(0, 100)])
    times = result["times_us"]
    assert tuple(times) == CPU_ROWS
    assert times["matmul"] == 40 and times["attention"] == 10 and times["data"] == 20
    assert times[GAPS] == 30 and result["overlap_us"] == 0
    assert sum(times.values()) == result["total_us"] == 100


def test_gpu_kernels_on_two_streams_count_in_both_and_overlap_once():
    """A compute kernel and an NCCL kernel at once: each category gets its kernel; the overlap is counted twice and
    reported so the rows still add up; a kernel across the step boundary is split between the steps."""
    kernels = [
        Record(0, 50, 50, ("sm90_xmma_gemm", "aten::mm")),
        Record(30, 70, 40, ("ncclDevKernel_AllGather", "nccl:all_gather", "ift::zero3 fetch")),
        Record(90, 110, 20, ("elementwise_kernel", "aten::mul")),  # half in each step
        Record(150, 160, 10, ("flash_bwd_kernel", "FlashAttentionBackward0")),
    ]
    result = breakdown(kernels, [(0, 100), (100, 200)])
    times = result["times_us"]
    assert result["steps"] == 2 and result["total_us"] == 200
    assert times["matmul"] == 50 and times["zero3"] == 40 and times[OTHER] == 20 and times["attention"] == 10
    assert result["overlap_us"] == 20  # 30..50
    assert times[GAPS] == 200 - (70 + 10 + 10 + 10)  # busy: 0..70, 90..100 | 100..110, 150..160
    assert sum(times.values()) - result["overlap_us"] == pytest.approx(result["total_us"])


def test_profiled_cpu_run_categories_add_up_to_the_step(tmp_path):
    """ift_dist.train under the profiler on CPU (one rank, tiny Llama): trace and breakdown written, every category
    of the train path seen, and the categories (self times) + host gaps = the step time."""
    command = [
        sys.executable, str(REPO / "bench/profile_step.py"), "--out", str(tmp_path), "--cpu",
        "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
        "--max-length", "128", "--micro-batch-rows", "2", "--steps", "2", "--warmup-steps", "1",
        "--tokenizer", str(TOKENIZERS / "smollm2-135m-instruct"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "trace.json").stat().st_size > 0
    summary = json.loads((tmp_path / "breakdown.json").read_text())
    host = summary["host"]
    assert host["steps"] == 2 and summary["regions_not_found"] == []
    times = host["times_us"]
    for category in ("data", "zero3", "loss", "attention", "optimizer", "matmul", OTHER):
        assert times[category] > 0, (category, times)
    assert times[GAPS] >= 0
    # Self times tile the ops' intervals: nothing counted twice, nothing lost (1% for the profiler's rounding).
    assert abs(host["overlap_us"]) <= 0.01 * host["total_us"], host
    assert sum(times.values()) == pytest.approx(host["total_us"], rel=0.01)
    assert "| category | ms / step | % |" in done.stdout and "| host gaps |" in done.stdout
