"""data.quality end to end on real files: the stages run in order over scanned sources, each removal has one reason,
the counts add up, the kept set follows source priority, the loader trains on the kept records only, and the `ift
data` commands report and write what was removed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from shared_paths import DATA, REPO, TOKENIZERS

from ift_dist.config import load_config
from ift_dist.data.loader import build_loader
from ift_dist.data.quality.stage import quality_active, run_quality, scan_training_sources
from ift_dist.data.render import load_tokenizer
from ift_dist.data.scan import scan_sources

ALPACA = DATA / "llamafactory" / "alpaca_en_demo.json"


@pytest.fixture
def files(tmp_path):
    """A copy of 60 real Alpaca records (first), and a second source holding 10 of them again, 5 with an edited
    word (near-duplicates), an MMLU question and a refusal."""
    records = json.loads(ALPACA.read_text())[:60]
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in records))
    mmlu_row = (DATA / "eval" / "mmlu" / "test" / "marketing_test.csv").read_text().splitlines()[0]
    second_records = [dict(r) for r in records[:10]]
    for record in second_records[5:]:
        record["output"] = record["output"].replace(" the ", " a ", 1) + " Indeed."
    second_records.append(
        {"instruction": "Answer this: " + mmlu_row.split(",")[0] + " " + mmlu_row, "input": "", "output": "B"}
    )
    second_records.append(
        {
            "instruction": "Tell me a joke about cats please",
            "input": "",
            "output": "As an AI language model, I cannot.",
        }
    )
    second = tmp_path / "second.jsonl"
    second.write_text("".join(json.dumps(r) + "\n" for r in second_records))
    return first, second


def config(tmp_path, files, *overrides):
    first, second = files
    text = f"""
output_dir: {tmp_path / "run"}
model: {{name_or_path: {tmp_path / "no-model"}}}
data:
  tokenizer: {TOKENIZERS / "smollm2-135m-instruct"}
  max_length: 256
  num_workers: 0
  sources:
    - {{path: {first}, name: first}}
    - {{path: {second}, name: second}}
"""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return load_config(str(path), list(overrides))


def test_nothing_configured_changes_nothing(tmp_path, files):
    cfg = config(tmp_path, files)
    assert not quality_active(cfg.data.quality)
    scanned = scan_training_sources(cfg.data)
    assert [len(item.scan.valid_indices) for item in scanned] == [60, 12]
    assert all(item.removals == [] for item in scanned)


def test_stages_in_order_with_one_reason_each(tmp_path, files):
    cfg = config(
        tmp_path,
        files,
        "data.quality.filters.refusal=true",
        "data.quality.dedup.exact=true",
        "data.quality.dedup.near=true",
        "data.quality.dedup.threshold=0.7",
        f"data.quality.decontaminate=[{DATA / 'eval' / 'mmlu'}]",
    )
    scanned = scan_sources(cfg.data.sources)
    result = run_quality(scanned, cfg.data)
    reasons = {(r.ref.source, r.ref.index): r.reason for r in result.removals}
    assert len(reasons) == len(result.removals)  # one reason per record
    # the first source keeps all its records: it is visited first, so its records are the ones duplicates match
    assert not [r for r in result.removals if r.ref.source == "first"]
    assert [reasons[("second", i)] for i in range(5)] == ["duplicate"] * 5
    assert {reasons.get(("second", i)) for i in range(5, 10)} <= {"near_duplicate", None}
    assert reasons[("second", 10)] == "contaminated"
    assert reasons[("second", 11)] == "filter:refusal"
    duplicate = next(r for r in result.removals if r.reason == "duplicate")
    assert duplicate.matched == f"first:{duplicate.ref.index}"
    assert "mmlu" in next(r for r in result.removals if r.reason == "contaminated").matched

    result.apply(scanned)
    second = next(item for item in scanned if item.scan.name == "second")
    removed = {r.ref.index for r in second.removals}
    assert set(second.scan.valid_indices.tolist()) == set(range(12)) - removed
    assert result.counts()["second"]["duplicate"] == 5


def test_priority_keeps_the_preferred_source(tmp_path, files):
    cfg = config(tmp_path, files, "data.quality.dedup.exact=true", "data.quality.dedup.priority=[second]")
    result = run_quality(scan_sources(cfg.data.sources), cfg.data)
    assert {r.ref.source for r in result.removals} == {"first"}
    assert sorted(r.ref.index for r in result.removals) == list(range(5))
    assert all(r.matched == f"second:{r.ref.index}" for r in result.removals)


def test_an_unknown_priority_source_is_named(tmp_path, files):
    cfg = config(tmp_path, files, "data.quality.dedup.exact=true", "data.quality.dedup.priority=[thrid]")
    with pytest.raises(ValueError, match=r"dedup.priority: no source named \['thrid'\]"):
        run_quality(scan_sources(cfg.data.sources), cfg.data)


def test_the_loader_reads_only_kept_records(tmp_path, files):
    tokenizer = load_tokenizer(str(TOKENIZERS / "smollm2-135m-instruct"))

    def refs(*overrides: str) -> list[str]:
        cfg = config(tmp_path, files, "data.packing=false", "data.max_length=2048", *overrides)
        loader = build_loader(cfg.data, tokenizer, rank=0, world_size=1, rows_per_batch=4, epochs=1)
        return sorted(str(ref) for batch in loader for row in batch.refs for ref in row)

    everything, kept = refs(), refs("data.quality.dedup.exact=true")
    assert len(everything) == 72
    assert kept == sorted(set(everything) - {f"second:{i}" for i in range(5)})


def test_balance_caps_groups_after_the_other_stages(tmp_path, files):
    cfg = config(
        tmp_path, files, "data.quality.balance.by=source", "data.quality.balance.max_per_group=20", "seed=3"
    )
    scanned = scan_sources(cfg.data.sources)
    result = run_quality(scanned, cfg.data)
    result.apply(scanned)
    assert [len(item.scan.valid_indices) for item in scanned] == [20, 12]
    again = scan_sources(cfg.data.sources)
    run_quality(again, cfg.data).apply(again)
    np.testing.assert_array_equal(again[0].scan.valid_indices, scanned[0].scan.valid_indices)


@pytest.mark.e2e
def test_ift_data_dedup_and_stats_report_and_write(tmp_path, files):
    config(tmp_path, files)  # writes run.yaml
    cfg_path = tmp_path / "run.yaml"
    ift = str(Path(sys.executable).with_name("ift"))
    out = tmp_path / "dedup"
    run = subprocess.run(
        [ift, "data", "dedup", str(cfg_path), "--out", str(out)], capture_output=True, text=True, cwd=REPO
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "second: 12 valid records" in run.stdout and "duplicate" in run.stdout
    kept = [json.loads(line) for line in (out / "kept.jsonl").read_text().splitlines()]
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    assert len(kept) + len(removed) == 72 and len(removed) >= 5
    assert {r["ref"] for r in removed} >= {f"second:{i}" for i in range(5)}

    stats = subprocess.run(
        [ift, "data", "stats", str(cfg_path), "data.quality.dedup.exact=true", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert stats.returncode == 0, stats.stderr[-3000:]
    report = json.loads(stats.stdout)
    assert report["quality"]["by_reason"] == {"duplicate": 5}
    assert [s["quality_removed"] for s in report["sources"]] == [0, 5]


def test_balance_weights_list_records_as_often_as_their_group_weighs(tmp_path, files):
    cfg = config(
        tmp_path,
        files,
        "data.quality.balance.by=source",
        "data.quality.balance.weights={first: 2.0, second: 0.5}",
        "data.packing=false",
        "data.max_length=2048",
    )
    scanned = scan_sources(cfg.data.sources)
    run_quality(scanned, cfg.data).apply(scanned)
    first, second = (item.scan.valid_indices for item in scanned)
    assert np.array_equal(first, np.repeat(np.arange(60), 2))
    assert 0 < len(second) < 12 and len(set(second.tolist())) == len(second)  # a seeded half, each once
    tokenizer = load_tokenizer(str(TOKENIZERS / "smollm2-135m-instruct"))
    loader = build_loader(
        cfg.data, tokenizer, rank=0, world_size=1, rows_per_batch=8, epochs=1, scanned=scanned
    )
    refs = [str(ref) for batch in loader for row in batch.refs for ref in row]
    assert sorted(refs.count(f"first:{i}") for i in range(60)) == [2] * 60
    assert len(refs) == 120 + len(second)


@pytest.mark.e2e
def test_ift_data_preview_shows_why_records_were_dropped(tmp_path, files):
    cfg = config(tmp_path, files)  # writes run.yaml
    html_path = tmp_path / "preview.html"
    ift = str(Path(sys.executable).with_name("ift"))
    run = subprocess.run(
        [ift, "data", "preview", str(tmp_path / "run.yaml"), "data.quality.dedup.exact=true", "-n", "2",
         "--no-color", "--html", str(html_path)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "removed by data.quality: second:0 duplicate (matches first:0)" in run.stdout
    page = html_path.read_text()
    assert "Removed by data.quality, and why" in page and "second:1 &middot; <b>duplicate</b>" in page
    assert cfg.data.sources[1].name == "second"
