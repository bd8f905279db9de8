"""bench/attention_bench.py at a tiny size on CPU: its rows follow the length mix, every CPU backend passes its check
against the sdpa reference, attention that ignores the sample boundaries is marked WRONG and never fastest, and the
table and JSON carry what the GPU run is read for."""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from shared_paths import REPO, SHARED, TOKENIZERS

sys.path.insert(0, str(REPO / "bench"))  # bench/ holds scripts, not a package

from attention_bench import (
    Contender,
    bench,
    chat_lengths,
    fastest_correct,
    lognormal_lengths,
    main,
    make_inputs,
    pack_rows,
    packed_batch,
    registered_contenders,
)

TINY = {"batch": 2, "length": 128, "heads": 4, "kv_heads": 2, "head_dim": 16}
TINY_ARGS = ["--device", "cpu", "--max-length", "128", "--batch", "2", "--heads", "4", "--kv-heads", "2",
             "--head-dim", "16", "--lengths", "lognormal:24,0.8", "--warmup", "1", "--repeats", "2"]  # fmt: skip
TIMING = argparse.Namespace(layers=16, warmup=1, repeats=2)


def tiny_case(seed: int = 0):
    pool = lognormal_lengths(24, 0.8, 200, seed)
    batch = packed_batch(pack_rows(pool, TINY["length"], TINY["batch"], seed), TINY["length"])
    inputs = make_inputs(**TINY, dtype=torch.float32, device="cpu", seed=seed)
    return batch, inputs


def test_rows_are_drawn_from_the_length_mix_and_packed_greedily():
    pool = lognormal_lengths(24, 0.8, 200, seed=3)
    rows = pack_rows(pool, 128, 4, seed=3)
    assert len(rows) == 4
    allowed = {min(length, 128) for length in pool}
    for row, following in zip(rows, [*rows[1:], None], strict=True):
        assert row and set(row) <= allowed and sum(row) <= 128
        if following is not None:  # a row closes only when the next sample does not fit
            assert sum(row) + following[0] > 128
    assert sum(len(row) for row in rows) > 8  # several samples per row: boundaries to respect
    assert pack_rows(pool, 128, 4, seed=3) == rows  # seeded


def test_chat_lengths_are_token_counts_of_real_records():
    lengths = chat_lengths(TOKENIZERS / "llama-3.1-instruct", records=15, seed=0, shared=SHARED)
    assert len(lengths) == 15
    # The llama-3.1 template alone adds a few dozen tokens; tool-calling and multi-turn records run to hundreds.
    assert min(lengths) > 20 and max(lengths) > 200


def test_cpu_backends_agree_with_the_reference():
    batch, inputs = tiny_case()
    contenders = [c for c in registered_contenders() if c.name in ("sdpa", "eager")]
    results = bench(contenders, inputs, batch, torch.float32, TIMING)
    assert [r.status for r in results] == ["ok", "ok"], [r.detail for r in results]
    for result in results:
        assert result.out_diff < 1e-5 and result.grad_diff < 1e-5
        assert result.fwd_bwd_ms > 0 and result.step_ms >= 16 * result.fwd_bwd_ms
        assert result.peak_mib is None  # no memory figure on CPU
    assert min(r.ratio for r in results) == 1.0
    assert fastest_correct(results) in ("sdpa", "eager")


def causal_only(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention over the whole row: the boundaries in kwargs are ignored, samples see each other."""
    out_BHTD = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=True
    )
    return out_BHTD.transpose(1, 2).contiguous(), None


def test_attention_that_ignores_the_boundaries_is_wrong_and_never_fastest():
    batch, inputs = tiny_case()
    sdpa = next(c for c in registered_contenders() if c.name == "sdpa")
    contenders = [Contender("causal_only", causal_only, "sdpa"), sdpa]
    wrong, right = bench(contenders, inputs, batch, torch.float32, TIMING)
    assert wrong.status == "WRONG" and wrong.out_diff > 1e-2 and wrong.step_ms is None
    assert right.status == "ok"
    assert fastest_correct([wrong, right]) == "sdpa"


def test_table_and_json_name_the_device_the_winner_and_auto(tmp_path, capsys):
    out = tmp_path / "attention.json"
    main([*TINY_ARGS, "--json", str(out)])
    printed = capsys.readouterr().out
    assert "fastest correct: " in printed and "auto picks today: sdpa" in printed
    assert "ms" in printed and "peak MiB" in printed and "n/a" in printed
    assert any(line.startswith("| sdpa | ok |") for line in printed.splitlines())  # markdown rows
    payload = json.loads(out.read_text())
    assert {"date", "device", "torch", "dtype", "shape", "lengths", "auto"} <= payload["header"].keys()
    assert payload["fastest_correct"] in ("sdpa", "eager")
    rows = {row["backend"]: row for row in payload["rows"]}
    assert rows.keys() == {"flash_attn", "torch_varlen", "flex", "sdpa", "eager"}
    assert rows["sdpa"]["status"] == rows["eager"]["status"] == "ok"
    assert rows["torch_varlen"]["status"] == "skipped" and "CUDA" in rows["torch_varlen"]["detail"]
    for field in ("fwd_bwd_ms", "ratio", "peak_mib", "out_diff", "grad_diff", "setup_ms", "step_ms"):
        assert field in rows["sdpa"]
    assert all(sum(row) <= 128 for row in payload["seq_lens"])
