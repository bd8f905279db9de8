"""sources.py: files, globs, directories and save_to_disk directories -> lazily indexed records and scans."""

from __future__ import annotations

import json
import multiprocessing
import pathlib
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ift_dist.config import SourceConfig
from ift_dist.data import json_array
from ift_dist.data.contracts import Conversation, DataFileError, SampleRef
from ift_dist.data.sources import RecordSource, open_source

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "records"
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
IDENTITY = {"name": "Ada", "author": "Lab"}


def source_of(path, **options) -> RecordSource:
    return open_source(SourceConfig(path=str(path), **options))


def contents(source: RecordSource) -> list:
    """What training sees of each record, without the ref (whose source name differs between layouts)."""
    return [(c.messages, c.tools) if isinstance(c, Conversation) else c.reason for c in source]


# ------------------------------------------------------------------------------------------ real shared data

SHARED = [
    # (file, options, format, records, valid)
    ("llamafactory/alpaca_en_demo.json", {}, "alpaca", 999, 999),
    ("llamafactory/alpaca_zh_demo.json", {}, "alpaca", 1000, 1000),
    ("llamafactory/identity.json", {"placeholders": IDENTITY}, "alpaca", 91, 91),
    ("llamafactory/glaive_toolcall_en_demo.json", {}, "sharegpt", 300, 300),
    ("llamafactory/glaive_toolcall_zh_demo.json", {}, "sharegpt", 300, 298),
    ("llamafactory/kto_en_demo.json", {"where": {"label": True}}, "openai", 300, 150),
    ("fastchat/dummy_conversation.json", {}, "sharegpt", 500, 500),
    ("stanford_alpaca/seed_tasks.jsonl", {}, "alpaca", 175, 175),
]


@pytest.mark.parametrize(
    ("file", "options", "fmt", "records", "valid"), SHARED, ids=[row[0] for row in SHARED]
)
def test_every_shared_training_file_parses(file, options, fmt, records, valid):
    source = source_of(DATA / file, **options)
    scan = source.scan()
    assert scan.name == Path(file).stem
    assert scan.formats == {str(DATA / file): fmt}
    assert (scan.num_records, len(scan.valid_indices)) == (records, valid)
    assert scan.valid_indices.dtype == np.int64 and np.all(np.diff(scan.valid_indices) > 0)
    assert scan.trimmed_trailing_turns == 0
    assert scan.filtered == (150 if "where" in options else 0)
    index = int(scan.valid_indices[-1])
    conversation = source.get(index)
    assert conversation.ref == SampleRef(scan.name, index)
    assert conversation.messages[-1].role == "assistant"


def test_glaive_zh_has_two_tool_results_without_a_tool_call():
    scan = source_of(DATA / "llamafactory/glaive_toolcall_zh_demo.json").scan()
    assert scan.bad_counts == {"role_order": 2}
    assert [(bad.location, bad.field) for bad in scan.bad] == [
        ("record 197", "conversations[2].from"),
        ("record 293", "conversations[2].from"),
    ]
    assert 197 not in scan.valid_indices and 293 not in scan.valid_indices


def test_glaive_en_turns_and_tools_match_the_data_readme():
    source = source_of(DATA / "llamafactory/glaive_toolcall_en_demo.json")
    conversations = list(source)
    # data/README.md: messages per record 2:39, 4:75, 6:64, 8:44, 10:69, 12:8, 14:1
    assert Counter(len(c.messages) for c in conversations) == {
        2: 39,
        4: 75,
        6: 64,
        8: 44,
        10: 69,
        12: 8,
        14: 1,
    }
    calls = [call for c in conversations for m in c.messages for call in m.tool_calls or []]
    assert len(calls) == 211 and all(isinstance(call["function"]["arguments"], dict) for call in calls)
    with_tools = [c for c in conversations if c.tools]  # the other 109 give "[]"
    assert (len(with_tools), sum(len(c.tools) for c in with_tools)) == (191, 219)
    assert all(
        tool["type"] == "function" and "name" in tool["function"] for c in with_tools for tool in c.tools
    )
    assert {m.role for c in conversations for m in c.messages} == {"user", "assistant", "tool"}


def test_fastchat_turns_and_alpaca_inputs_match_the_data_readme():
    fastchat = list(source_of(DATA / "fastchat/dummy_conversation.json"))
    assert Counter(len(c.messages) for c in fastchat) == {2: 167, 4: 166, 6: 167}
    alpaca = list(source_of(DATA / "llamafactory/alpaca_en_demo.json"))
    assert sum(1 for c in alpaca if c.messages[0].alpaca[1]) == 412


def test_identity_placeholders_are_filled():
    conversations = list(source_of(DATA / "llamafactory/identity.json", placeholders=IDENTITY))
    texts = [m.content for c in conversations for m in c.messages]
    assert not any("{{" in text for text in texts)
    # 77 answers hold {{name}}, 60 hold {{author}}; nothing else says "Ada" or "Lab".
    assert (sum("Ada" in text for text in texts), sum("Lab" in text for text in texts)) == (77, 60)
    unfilled = list(source_of(DATA / "llamafactory/identity.json"))
    assert sum("{{name}}" in c.messages[1].content for c in unfilled) == 77


# ------------------------------------------------------------------------------------------ bad records in files

EXPECTED_BAD = [
    # (index, reason, location, field)
    (1, "invalid_json", "line 2", None),
    (2, "non_utf8", "line 3", None),
    (3, "wrong_type", "line 5", "conversations[0].value"),
    (4, "missing_field", "line 6", "conversations[0].value"),
    (5, "unknown_role", "line 7", "conversations[1].from"),
    (6, "no_assistant", "line 8", "conversations"),
    (7, "empty_assistant", "line 9", "conversations[1].value"),
    (8, "role_order", "line 10", "conversations[0].from"),
    (9, "invalid_tools", "line 11", "tools[0].name"),
    (10, "invalid_tool_call", "line 12", "conversations[1].value"),
    (12, "wrong_type", "line 14", None),
    (13, "invalid_tools", "line 16", "tools"),
]


def test_every_bad_record_kind_in_a_file_is_counted_and_located():
    path = FIXTURES / "bad_records.jsonl"
    source = source_of(path)
    scan = source.scan()
    assert len(source) == scan.num_records == 14  # 16 lines, 2 blank
    assert scan.valid_indices.tolist() == [0, 11]
    assert scan.trimmed_trailing_turns == 2  # line 13 ends with a user turn and a tool result
    assert [(b.reason, b.location, b.field) for b in scan.bad] == [row[1:] for row in EXPECTED_BAD]
    assert scan.bad_counts == dict(Counter(row[1] for row in EXPECTED_BAD))
    assert all(b.file == str(path) for b in scan.bad)
    for index, reason, _, _ in EXPECTED_BAD:
        assert source.get(index).reason == reason  # get and scan agree
    by_reason = {b.reason: b for b in scan.bad}
    assert "Expecting ',' delimiter at column 52" in by_reason["invalid_json"].detail
    offset = path.read_bytes().index(b"\xe9")
    assert f"byte offset {offset}" in by_reason["non_utf8"].detail
    assert source.get(11).messages[-1].content == "ok"


def test_non_utf8_bytes_in_a_json_array_name_the_field():
    path = FIXTURES / "not_utf8_array.json"
    scan = source_of(path).scan()
    assert scan.valid_indices.tolist() == [0, 2]
    assert [(b.reason, b.location, b.field) for b in scan.bad] == [("non_utf8", "record 1", "instruction")]


def test_column_and_role_mapping_from_files():
    alpaca = source_of(
        FIXTURES / "columns_alpaca.jsonl",
        columns={
            "instruction": "prompt",
            "input": "query",
            "output": "response",
            "system": "sys",
            "history": "turns",
        },
    )
    first = alpaca.get(0)
    assert [(m.role, m.content) for m in first.messages] == [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello"),
        ("user", "Translate\n\nchat"),
        ("assistant", "cat"),
    ]
    assert alpaca.get(1).messages[0].alpaca == ("Name a colour", "")
    options = {
        "columns": {"conversations": "dialog", "from": "speaker", "value": "text"},
        "roles": {"me": "user", "bot": "assistant", "narrator": "system"},
    }
    chat = source_of(FIXTURES / "roles_sharegpt.jsonl", **options)
    assert chat.formats == {str(FIXTURES / "roles_sharegpt.jsonl"): "sharegpt"}
    assert [m.role for m in chat.get(1).messages] == ["system", "user", "assistant"]
    unmapped = source_of(FIXTURES / "roles_sharegpt.jsonl", columns=options["columns"]).scan()
    assert unmapped.bad_counts == {"unknown_role": 2}


def test_openai_tools_where_and_placeholders_from_a_file():
    source = source_of(FIXTURES / "openai_tools.jsonl", where={"label": True}, placeholders={"name": "Ada"})
    scan = source.scan()
    assert (scan.valid_indices.tolist(), scan.filtered, scan.bad) == ([0, 2], 1, [])
    first, third = source.get(0), source.get(2)
    assert first.messages[0].content == "You are Ada."
    assert first.messages[2].tool_calls[0]["function"]["arguments"] == {"city": "Paris"}
    assert first.tools == third.tools  # a list and a JSON string of the same tool
    assert [m.role for m in third.messages] == ["user", "assistant", "tool", "tool", "assistant"]
    firefly = source_of(FIXTURES / "firefly.jsonl")
    assert firefly.formats == {str(FIXTURES / "firefly.jsonl"): "firefly"}
    assert [m.role for m in firefly.get(1).messages] == ["system", "user", "assistant"]


# ------------------------------------------------------------------------------------------ layouts


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path


def write_layouts(root: Path, records: list) -> dict[str, Path | str]:
    import datasets

    layouts: dict[str, Path | str] = {}
    layouts["json"] = root / "array.json"
    layouts["json"].write_text(json.dumps(records, ensure_ascii=False, indent=1))
    layouts["jsonl"] = write_jsonl(root / "lines.jsonl", records)
    layouts["json_lines_in_json"] = write_jsonl(root / "lines_in.json", records)
    layouts["parquet"] = root / "table.parquet"
    pq.write_table(pa.Table.from_pylist(records), layouts["parquet"], row_group_size=7)
    layouts["save_to_disk"] = root / "saved"
    datasets.Dataset.from_list(records).save_to_disk(str(layouts["save_to_disk"]))
    parts = root / "parts"
    parts.mkdir()
    third = len(records) // 3
    # Names sort in record order although written out of it: the index follows the sorted names.
    pq.write_table(pa.Table.from_pylist(records[2 * third :]), parts / "part-2.parquet", row_group_size=5)
    write_jsonl(parts / "part-0.jsonl", records[:third])
    (parts / "part-1.json").write_text(json.dumps(records[third : 2 * third]))
    (parts / "notes.txt").write_text("not data")
    layouts["directory"] = parts
    layouts["glob"] = str(parts / "part-*")
    return layouts


def test_every_layout_of_the_same_records_gives_the_same_conversations(tmp_path):
    records = json.loads((DATA / "llamafactory/glaive_toolcall_en_demo.json").read_text())[:40]
    layouts = write_layouts(tmp_path, records)
    expected = contents(source_of(layouts["json"]))
    assert len(expected) == 40 and all(isinstance(item, tuple) for item in expected)
    for kind, path in layouts.items():
        source = source_of(path)
        assert contents(source) == expected, kind
        assert [source.get(i).messages for i in (0, 13, 39)] == [expected[i][0] for i in (0, 13, 39)], kind
        assert source.scan().valid_indices.tolist() == list(range(40)), kind
    assert source_of(layouts["directory"]).name == "parts"
    assert source_of(layouts["glob"]).name == "parts"
    assert len(source_of(layouts["directory"]).files) == 3


def test_arrow_schema_union_nones_are_missing_fields(tmp_path):
    weather = {
        "name": "get_weather",
        "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    clock = {
        "name": "get_time",
        "description": "Time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    }
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    records = [
        {
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "21", "name": "get_weather"},
                {"role": "assistant", "content": "21 degrees."},
            ],
            "tools": [{"type": "function", "function": weather}],
        },
        {
            "messages": [{"role": "user", "content": "Time?"}, {"role": "assistant", "content": "Noon."}],
            "tools": [{"type": "function", "function": clock}],
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    layouts = write_layouts(tmp_path, records)
    expected = contents(source_of(layouts["jsonl"]))
    assert expected[1][1] == [{"type": "function", "function": clock}] and expected[2][1] is None
    for kind in ("parquet", "save_to_disk", "directory"):
        assert contents(source_of(layouts[kind])) == expected, kind


def test_blank_lines_bom_and_index_across_files(tmp_path):
    path = tmp_path / "b.jsonl"
    line = json.dumps({"instruction": "Hi", "output": "Hello"})
    path.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\n\n  \n" + line.replace("Hi", "Yo").encode())
    source = source_of(path)
    assert len(source) == 2
    assert source.get(1).messages[0].content == "Yo"
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "First", "output": "1"}])
    both = source_of(tmp_path)
    assert [c.messages[0].content for c in both] == ["First", "Hi", "Yo"]
    assert both.get(2).ref == SampleRef(tmp_path.name, 2)
    with pytest.raises(IndexError):
        both.get(3)
    bad = source_of(path, format="sharegpt").get(1)
    assert (bad.reason, bad.location, bad.file) == ("missing_field", "line 4", str(path))


def test_parsed_json_arrays_are_kept_per_process_and_a_mix_parses_each_once(tmp_path, monkeypatch):
    """A mix alternates between its sources: each JSON array file is parsed once, not at every switch; the least
    recently read file goes first beyond 8."""
    json_array.clear_cache()
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps([{"instruction": name, "output": "x"}] * 3))
    parses = []
    real_loads = json_array.json.loads
    monkeypatch.setattr(json_array.json, "loads", lambda text: parses.append(1) or real_loads(text))
    source = source_of(tmp_path)
    assert [source.get(i).messages[0].content for i in (0, 3, 1, 4, 2, 5)] == ["a", "b", "a", "b", "a", "b"]
    assert len(parses) == 2
    for index in range(9):
        (tmp_path / f"c{index}.json").write_text(json.dumps([{"instruction": "c", "output": "x"}]))
        json_array.JsonArrayFile(tmp_path / f"c{index}.json")
    assert (tmp_path / "a.json") not in json_array.cached_paths()
    assert len(json_array.cached_paths()) == 8 and json_array.cached_paths()[-1] == tmp_path / "c8.json"


# ------------------------------------------------------------------------------------------ unreadable files


def test_unreadable_sources_raise_data_file_error_at_open(tmp_path, monkeypatch):
    def fails(path, match: str, **options):
        with pytest.raises(DataFileError, match=match):
            source_of(path, **options)

    fails(tmp_path / "missing.jsonl", "missing.jsonl: no such file or directory")
    fails(tmp_path / "*.jsonl", r"\*\.jsonl: the glob matches no")
    (tmp_path / "empty_dir").mkdir()
    fails(tmp_path / "empty_dir", "empty_dir: directory holds no")
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},\n {"instruction": ')
    fails(tmp_path / "broken.json", r"broken\.json: not valid JSON: .* at line 2 column")
    (tmp_path / "object.json").write_text('{\n  "data": [{"instruction": "a", "output": "b"}]\n}\n')
    fails(tmp_path / "object.json", "holds one JSON object")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    fails(tmp_path / "corrupt.parquet", "corrupt.parquet: not a readable Parquet file")
    (tmp_path / "notes.txt").write_text("hello")
    fails(tmp_path / "notes.txt", "unsupported file type")
    write_jsonl(tmp_path / "unknown.jsonl", [{"prompt": "a", "completion": "b"}])
    fails(tmp_path / "unknown.jsonl", r"unknown\.jsonl: cannot tell the record format .*prompt, completion")
    assert source_of(tmp_path / "unknown.jsonl", format="alpaca").get(0).reason == "missing_field"
    (tmp_path / "nothing.jsonl").write_text("\n\n")
    fails(tmp_path / "nothing.jsonl", "holds no records")

    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([{"instruction": "a", "output": "b"}])}
    ).save_to_disk(str(tmp_path / "dict"))
    fails(tmp_path / "dict", "holds a DatasetDict")

    locked = write_jsonl(tmp_path / "locked.jsonl", [{"instruction": "a", "output": "b"}])
    real_open = pathlib.Path.open

    def denied(self, *args, **kwargs):  # tests may run as root, where chmod 000 does not stop reading
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", denied)
    fails(locked, "locked.jsonl: cannot read: Permission denied")


# ------------------------------------------------------------------------------------------ processes


def read_all(source: RecordSource, queue) -> None:
    queue.put([source.get(index) for index in range(len(source))])


def test_sources_pickle_without_data_and_read_in_forked_processes(tmp_path):
    records = json.loads((DATA / "fastchat/dummy_conversation.json").read_text())[:30]
    layouts = write_layouts(tmp_path, records)
    context = multiprocessing.get_context("fork")
    for kind in ("jsonl", "json", "parquet", "save_to_disk", "directory"):
        source = source_of(layouts[kind])
        expected = [source.get(index) for index in range(len(source))]  # opens handles in this process
        assert all(isinstance(item, Conversation) for item in expected)
        state = pickle.dumps(source)
        assert b"I am Vicuna" not in state, kind  # the index travels, the records do not
        assert [pickle.loads(state).get(i) for i in range(len(source))] == expected, kind
        queue = context.Queue()
        child = context.Process(target=read_all, args=(source, queue))  # inherited, not pickled
        child.start()
        got = queue.get(timeout=60)
        child.join(timeout=60)
        assert child.exitcode == 0 and got == expected, kind
    with context.Pool(2) as pool:  # DataLoader-style: the source pickled into worker processes
        source = source_of(layouts["parquet"])
        assert pool.starmap(RecordSource.get, [(source, i) for i in range(len(source))]) == list(source)
