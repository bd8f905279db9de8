"""The real `ift data ...` command line on real shared data and a real tokenizer, run as a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ift_dist.config import load_config
from ift_dist.data.loader import build_loader
from ift_dist.data.render import load_tokenizer
from ift_dist.data.report import batch_rows

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
FIXTURES = REPO / "tests" / "fixtures" / "records"
TOKENIZER = SHARED / "tokenizers" / "smollm2-135m-instruct"


def ift(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ift_dist.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        f"""
data:
  tokenizer: {TOKENIZER}
  max_length: 512
  pack_buffer: 200
  sources:
    - path: {SHARED / "data/llamafactory/identity.json"}
      name: identity
      placeholders: {{name: Nimbus, author: Team Cloud}}
    - path: {SHARED / "data/fastchat/dummy_conversation.json"}
      name: fastchat
      weight: 0.5
"""
    )
    return path


def test_prepare_writes_shards_that_training_streams(config_file: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    result = ift(
        "data", "prepare", str(config_file), "--out", str(out), "--num-proc", "2", "--rows-per-shard", "16"
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "ift-dist-prepared"
    shards = sorted(out.glob("shard-*.parquet"))
    assert [shard["file"] for shard in manifest["shards"]] == [path.name for path in shards]
    assert len(shards) > 1
    table = pq.read_table(shards[0])
    assert table.schema.field("input_ids").type.value_type.bit_width == 32
    assert set(table.column_names) == {"input_ids", "labels", "position_ids", "seq_lens", "sources"}

    rows = [row for shard in shards for row in pq.read_table(shard).to_pylist()]
    assert len(rows) == manifest["rows"]
    refs = [ref for row in rows for ref in row["sources"]]
    # 91 identity records + round(0.5 x 500) fastchat records, each exactly once.
    assert len(refs) == len(set(refs)) == 91 + 250
    assert manifest["report"]["samples"]["rendered"] == len(refs)
    for row in rows:
        assert len(row["input_ids"]) == sum(row["seq_lens"]) <= 512
        start = 0
        for length in row["seq_lens"]:
            assert row["position_ids"][start : start + length] == list(range(length))
            assert row["labels"][start] == -100
            start += length
    text = " ".join(load_tokenizer(str(TOKENIZER)).decode(row["input_ids"]) for row in rows)
    assert "Nimbus" in text and "{{name}}" not in text

    # Training streams the shards: one epoch over them gives back exactly the prepared rows.
    config = load_config(config_file, [f"data.prepared={out}"])
    loader = build_loader(
        config.data, load_tokenizer(str(TOKENIZER)), rank=0, world_size=1, rows_per_batch=4, epochs=1
    )
    streamed = sorted(tuple(row.input_ids) for batch in loader for row in batch_rows(batch))
    assert streamed == sorted(tuple(row["input_ids"]) for row in rows)


def test_prepare_refuses_a_non_empty_directory(config_file: Path, tmp_path: Path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something").write_text("x")
    result = ift("data", "prepare", str(config_file), "--out", str(out))
    assert result.returncode != 0
    assert "not empty" in result.stderr


def test_stats_json(config_file: Path):
    result = ift("data", "stats", str(config_file), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [source["name"] for source in report["sources"]] == ["identity", "fastchat"]
    assert report["sources"][1]["planned"] == 250
    assert report["samples"]["rendered"] == 341
    assert 0 < report["tokens"]["supervised_ratio"] < 1
    assert report["lengths"]["p50"] <= report["lengths"]["p90"] <= report["lengths"]["max"] <= 512
    assert sum(report["lengths"]["histogram"]["counts"]) == 341
    assert report["turns"]["messages_histogram"] == {"2": 91 + 167, "4": 166, "6": 167}
    assert 0.5 < report["packing"]["efficiency"] <= 1.0


def test_stats_text(config_file: Path):
    result = ift("data", "stats", str(config_file))
    assert result.returncode == 0, result.stderr
    assert "Packing:" in result.stdout and "Token lengths:" in result.stdout and "identity" in result.stdout
    # Records, samples and rows are different counts: the text says which is which.
    assert (
        "A record is one line or item of a source file; a sample is one rendered conversation"
        in result.stdout
    )


def test_validate_lists_every_bad_record_with_file_line_and_field(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"data:\n  tokenizer: {TOKENIZER}\n  sources:\n    - path: {FIXTURES / 'bad_records.jsonl'}\n      name: bad\n"
    )
    result = ift("data", "validate", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "bad_records.jsonl, line 2" in out and "[invalid_json]" in out
    assert "[non_utf8]" in out and "[unknown_role]" in out and "[no_assistant]" in out
    assert "field conversations[1].from" in out
    assert "FAILED" in out


def test_validate_passes_on_clean_data(config_file: Path):
    result = ift("data", "validate", str(config_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
    # Each source is scanned once, so its log line appears once.
    assert result.stderr.count("source identity:") == result.stderr.count("source fastchat:") == 1, (
        result.stderr
    )


@pytest.fixture
def reasoning_template_config(tmp_path: Path) -> Path:
    """Qwen3's template on multi-turn data, one sample per conversation (data.multi_turn_mode whole): it drops the
    empty think block of earlier replies, so the 333 multi-turn conversations of FastChat's dummy data cannot be
    masked by prefixes."""
    templates = json.loads((SHARED / "tokenizers" / "chat_templates.json").read_text())["templates"]
    path = tmp_path / "qwen3.yaml"
    path.write_text(
        f"""
data:
  tokenizer: {SHARED / "tokenizers" / "qwen2.5-instruct"}
  max_length: 512
  multi_turn_mode: whole
  chat_template: {json.dumps(templates["Qwen-Qwen3-0.6B"]["template"])}
  sources:
    - path: {SHARED / "data/fastchat/dummy_conversation.json"}
      name: fastchat
"""
    )
    return path


def test_validate_names_each_dropped_sample(reasoning_template_config: Path):
    result = ift("data", "validate", str(reasoning_template_config), "--max-listed", "4")
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout.splitlines()
    assert "rendered 167 samples; dropped 333: template_not_prefix_stable 333" in out
    assert "  template_not_prefix_stable: 333 records" in out
    listed = [line for line in out if line.startswith("    fastchat:")]
    assert len(listed) == 4
    data_file = SHARED / "data/fastchat/dummy_conversation.json"
    assert listed[0].startswith(f"    fastchat:0 (record 0 of {data_file}): message 1: ")
    assert all(re.search(r"first differing token \d+ \(character \d+\)$", line) for line in listed)
    assert "    ... and 329 more (--json lists every one)" in out
    assert out[-1] == "FAILED"


def test_validate_json_lists_every_dropped_sample(reasoning_template_config: Path):
    result = ift("data", "validate", str(reasoning_template_config), "--json", "--max-listed", "4")
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["ok"] is False
    drops = report["dropped_samples"]
    assert len(drops) == report["samples"]["dropped"] == 333
    assert len({drop["ref"] for drop in drops}) == 333
    assert {drop["reason"] for drop in drops} == {"template_not_prefix_stable"}
    assert all("first differing token" in drop["detail"] for drop in drops)
    assert report["sources"] == [{"name": "fastchat", "records": 500, "valid": 500, "bad": []}]


def test_validate_in_auto_mode_trains_rewritten_conversations_per_turn(
    reasoning_template_config: Path, tmp_path
):
    """The same data in data.multi_turn_mode auto (the default): the 333 conversations Qwen3's template rewrites
    become one sample per assistant turn, counted, and none is left unmasked."""
    auto = tmp_path / "auto.yaml"
    auto.write_text(
        reasoning_template_config.read_text().replace("multi_turn_mode: whole", "multi_turn_mode: auto")
    )
    result = ift("data", "validate", str(auto), "--json")
    report = json.loads(result.stdout)
    samples = report["samples"]
    assert samples["per_turn_conversations"] == 333
    assert set(samples["dropped_by_reason"]) <= {"too_long"}
    turns = [
        sum(turn["from"] == "gpt" for turn in record["conversations"])
        for record in json.loads((SHARED / "data/fastchat/dummy_conversation.json").read_text())
    ]
    # Every turn of a rewritten conversation is a sample, or a turn too long with its history (reported).
    assert samples["per_turn_samples"] + samples["dropped"] == sum(n for n in turns if n > 1)
    assert samples["rendered"] == samples["per_turn_samples"] + sum(n == 1 for n in turns)
    assert result.returncode == 0 and report["ok"] is True
    text = ift("data", "validate", str(auto)).stdout
    assert (
        f"per-turn (data.multi_turn_mode): 333 conversations gave {samples['per_turn_samples']} samples"
        in text
    )


def test_on_bad_record_error_stops_before_anything_is_read(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"data:\n  tokenizer: {TOKENIZER}\n  on_bad_record: error\n"
        f"  sources:\n    - path: {FIXTURES / 'bad_records.jsonl'}\n"
    )
    result = ift("data", "stats", str(path))
    assert result.returncode == 1
    assert "bad_records.jsonl, line 2" in result.stderr


def test_unreadable_file_is_an_error_naming_it(tmp_path: Path):
    path = tmp_path / "missing.yaml"
    path.write_text(f"data:\n  tokenizer: {TOKENIZER}\n  sources:\n    - path: {tmp_path / 'nope.jsonl'}\n")
    result = ift("data", "stats", str(path))
    assert result.returncode == 1
    assert "nope.jsonl" in result.stderr


def test_config_typo_names_the_key(config_file: Path):
    result = ift("data", "stats", str(config_file), "data.max_lenght=10")
    assert result.returncode == 2
    assert "data.max_lenght" in result.stderr


def test_preview_html_goes_where_asked_from_the_working_directory(config_file: Path, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    result = ift("data", "preview", str(config_file), "-n", "1", "--html", "out/sub/page.html", cwd=work)
    assert result.returncode == 0, result.stderr
    assert (work / "out" / "sub" / "page.html").is_file()
    assert f"wrote {work / 'out' / 'sub' / 'page.html'}" in result.stdout  # the absolute path
    result = ift("data", "preview", str(config_file), "-n", "1", "--html", "pages/", cwd=work)
    assert result.returncode == 0, result.stderr
    assert (work / "pages" / "preview.html").is_file()  # a directory gets preview.html inside
    assert sorted(path.name for path in work.iterdir()) == ["out", "pages"]


def test_preview_marks_the_supervised_part(config_file: Path, tmp_path: Path):
    html_path = tmp_path / "preview.html"
    result = ift("data", "preview", str(config_file), "-n", "2", "--no-color", "--html", str(html_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- ") == 2
    assert "[[" in result.stdout and "<|im_end|>]]" in result.stdout
    page = html_path.read_text()
    assert page.count("<h2>") == 2 and 'class="sup"' in page
