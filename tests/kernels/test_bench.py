"""The benchmark runs end to end on CPU (fresh processes, resident-set peaks) and shows the memory goal in miniature:
the fused loss' peak above inputs and outputs is a small fraction of plain torch's. Our variants are rows of their own
beside the automatic dispatch."""

from __future__ import annotations

import re

import kernels_bench as bench

HEADER = "| N | H | V | dtype | ignored | impl | time ms | x torch | x liger | peak MiB | x torch | x liger |"


def test_benchmark_table_and_memory_ratio(capsys):
    bench.main(
        [
            "--devices",
            "cpu",
            "--impls",
            "ours",
            "torch",
            "--ours-variants",
            "ours_rows_inplace",
            "ours_rows_inplace_x4",
            "--shape",
            "1024,64,8000,float32,0.5",
            "--repeats",
            "1",
        ]
    )
    output = capsys.readouterr().out
    assert HEADER in output
    rows = {}
    for line in output.splitlines():
        match = re.match(
            r"\| 1024 \| 64 \| 8000 \| float32 \| 50% \| (\w+) \| ([\d.]+) \| ([\d.]*) \| ([\d.]*) "
            r"\| ([-\d.]+) \| ([-\d.]*) \| ([-\d.]*) \|",
            line,
        )
        if match:
            rows[match.group(1)] = match.groups()[1:]
    assert list(rows) == ["ours", "ours_rows_inplace", "ours_rows_inplace_x4", "torch"]
    assert rows["torch"][1] == "1.000" and rows["torch"][4] == "1.000"
    assert all(row[2] == "" and row[5] == "" for row in rows.values())  # no Liger on CPU: no ratio to it
    # Plain torch holds [512..1024, 8000] fp32 logits several times over (>= 16 MiB each); the chunks are ~4 MiB.
    assert float(rows["torch"][3]) > 30
    assert float(rows["ours"][4]) < 0.25
    assert float(rows["ours_rows_inplace"][4]) < 0.25


def test_variants_follow_ours_and_ignored_ratio_table():
    assert bench.expand_impls(["torch", "ours", "liger"], ["ours_rows_inplace", "ours_vocab"]) == [
        "torch",
        "ours",
        "ours_rows_inplace",
        "ours_vocab",
        "liger",
    ]
    assert bench.expand_impls(["ours", "ours_vocab"], ["ours_vocab"]) == ["ours", "ours_vocab"]
    ok = {"status": "ok", "peak_mib": 1.0}
    results = {
        (8, 4, 16, "bfloat16", 0.0): {"ours": {**ok, "time_ms": 10.0}, "liger": {"status": "n/a"}},
        (8, 4, 16, "bfloat16", 0.5): {"ours": {**ok, "time_ms": 6.0}, "liger": {"status": "n/a"}},
    }
    lines = bench._ignored_speedup(results, ["ours", "liger"])
    assert "| 8 | 4 | 16 | bfloat16 | 50% | ours | 0.600 |" in lines
    assert "| 8 | 4 | 16 | bfloat16 | 50% | liger |  |" in lines
