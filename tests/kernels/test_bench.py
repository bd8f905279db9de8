"""The benchmark runs end to end on CPU (fresh processes, resident-set peaks) and shows the memory goal in miniature:
the fused loss' peak above inputs and outputs is a small fraction of plain torch's."""

from __future__ import annotations

import re

import kernels_bench as bench


def test_benchmark_table_and_memory_ratio(capsys):
    bench.main(
        [
            "--devices",
            "cpu",
            "--impls",
            "ours",
            "torch",
            "--shape",
            "1024,64,8000,float32,0.5",
            "--repeats",
            "1",
        ]
    )
    output = capsys.readouterr().out
    assert "| N | H | V | dtype | ignored | impl | time ms | x torch | peak MiB | x torch |" in output
    rows = {}
    for line in output.splitlines():
        match = re.match(
            r"\| 1024 \| 64 \| 8000 \| float32 \| 50% \| (\w+) \| ([\d.]+) \| ([\d.]*) \| ([-\d.]+) \| ([-\d.]*) \|",
            line,
        )
        if match:
            rows[match.group(1)] = match.groups()[1:]
    assert set(rows) == {"ours", "torch"}
    assert rows["torch"][1] == "1.000" and rows["torch"][3] == "1.000"
    # Plain torch holds [512..1024, 8000] fp32 logits several times over (>= 16 MiB each); the chunks are ~4 MiB.
    assert float(rows["torch"][2]) > 30
    assert float(rows["ours"][3]) < 0.25
