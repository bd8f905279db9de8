"""What the data commands and the trainer show a person: a sample cut short with its supervised part marked, dropped
samples named by record (with where a template's renderings part), the records/samples/rows sentence of the report,
and where `--html` writes."""

from __future__ import annotations

import json

import pytest
import torch

from ift_dist.config import Config, DataConfig, SourceConfig
from ift_dist.data.commands import html_path
from ift_dist.data.contracts import (
    IGNORE_INDEX,
    Conversation,
    Dropped,
    Message,
    PackedBatch,
    RenderedSample,
    SampleRef,
)
from ift_dist.data.render import Renderer, load_tokenizer
from ift_dist.data.report import analyze
from ift_dist.data.views import TERMS, format_drops, format_report, format_sample

# Earlier replies are shortened once a later turn follows: multi-turn samples cannot be masked by prefixes.
REWRITING_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}"
    "{{ '<|im_start|>assistant\\n' + m.content[:3] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2(shared_dir):
    return load_tokenizer(str(shared_dir / "tokenizers" / "smollm2-135m-instruct"))


def long_sample(tokenizer) -> RenderedSample:
    messages = [
        {"role": "user", "content": "\n".join(f"question line {n}" for n in range(20))},
        {"role": "assistant", "content": "\n".join(f"answer line {n}" for n in range(20))},
    ]
    ids = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    prompt = len(
        tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True)["input_ids"]
    )
    labels = [IGNORE_INDEX] * prompt + ids[prompt:]
    return RenderedSample(ids, labels, SampleRef("chat", 7))


def test_a_sample_is_cut_to_the_lines_asked_for_and_says_how_much_is_left(smollm2):
    sample = long_sample(smollm2)
    whole = format_sample(sample, smollm2, color=False)
    short = format_sample(sample, smollm2, color=False, max_lines=4)
    header, *body, tail = short.splitlines()
    assert header == whole.splitlines()[0] and len(body) == 4
    assert tail.startswith("... (") and tail.endswith(" more characters)")
    left_out = int(tail.split("(")[1].split()[0])
    # shown + left out (the elided middle of the prompt too) = the whole text, without header and [[ ]] marks
    shown = "\n".join(body).replace("[[", "").replace("]]", "")
    assert len(shown) - shown.count(" [...] ") * len(" [...] ") + left_out == len(whole) - len(header) - 5


def test_a_long_prompt_keeps_its_start_and_end_so_the_reply_is_seen(smollm2):
    short = format_sample(long_sample(smollm2), smollm2, color=False, max_chars=400, max_lines=8)
    lines = short.splitlines()
    assert len(lines) == 1 + 8 + 1
    assert lines[1] == "<|im_start|>system"  # the start of the prompt
    assert "[...] question line 19<|im_end|>" in short  # its end
    assert "[[answer line 0\nanswer line 1" in short  # and the start of the supervised reply


def test_a_cut_inside_the_supervised_part_keeps_its_marks_closed(smollm2):
    sample = long_sample(smollm2)
    prompt_chars = len(
        smollm2.decode(
            [token for token, label in zip(sample.input_ids, sample.labels, strict=True) if label < 0]
        )
    )
    short = format_sample(sample, smollm2, color=False, max_chars=prompt_chars + 20)
    body = short.split("\n", 1)[1].rsplit("\n", 1)[0]
    assert body.count("[[") == body.count("]]") == 1 and body.endswith("]]")
    colored = format_sample(sample, smollm2, color=True, max_chars=prompt_chars + 20)
    assert colored.count("\x1b[1;32m") == colored.count("\x1b[0m") == 1


def test_the_first_training_sample_is_brief_and_points_to_the_preview(smollm2):
    from ift_dist.train import FIRST_SAMPLE_LINES, first_sample_text

    sample = long_sample(smollm2)
    ids = torch.tensor([sample.input_ids])
    batch = PackedBatch(
        ids, torch.tensor([sample.labels]), torch.zeros_like(ids), [[len(sample)]], [[sample.ref]]
    )
    text = first_sample_text(batch, smollm2, color=False)
    lines = text.splitlines()
    assert lines[0] == "first training sample:" and lines[1].startswith("--- chat:7")
    assert len(lines) <= FIRST_SAMPLE_LINES + 4 and len(text) < 800
    assert "more characters)" in text and "[[" in text
    assert lines[-1] == "(supervised text between [[ ]]; see `ift data preview CONFIG` for whole samples)"


def two_exchanges(index: int) -> Conversation:
    messages = [
        Message("user", "What is the capital of France?"),
        Message("assistant", "The capital of France is Paris."),
        Message("user", "And of Italy?"),
        Message("assistant", "Rome."),
    ]
    return Conversation(messages, SampleRef("chats", index))


def test_a_prefix_stability_drop_names_the_first_differing_token(shared_dir):
    qwen = load_tokenizer(str(shared_dir / "tokenizers" / "qwen2.5-instruct"))
    renderer = Renderer(qwen, DataConfig(chat_template=REWRITING_TEMPLATE, multi_turn_mode="whole"))
    result = renderer.render(two_exchanges(3))
    assert isinstance(result, Dropped) and result.reason == "template_not_prefix_stable"
    assert result.ref == SampleRef("chats", 3)
    # "<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n" then "The" vs "The capital": the reply's 2nd token.
    prompt = qwen.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        chat_template=REWRITING_TEMPLATE,
        add_generation_prompt=True,
        tokenize=True,
    )["input_ids"]
    characters = len(
        qwen.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            chat_template=REWRITING_TEMPLATE,
            add_generation_prompt=True,
            tokenize=False,
        )
    )
    assert result.detail.endswith(f"first differing token {len(prompt) + 1} (character {characters + 3})")


def test_analyze_names_every_dropped_record(tmp_path, shared_dir):
    data = tmp_path / "chats.jsonl"
    records = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        *[{"messages": [m.to_dict() for m in two_exchanges(0).messages]}] * 3,
    ]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    config = Config(
        data=DataConfig(
            tokenizer=str(shared_dir / "tokenizers" / "qwen2.5-instruct"),
            chat_template=REWRITING_TEMPLATE,
            multi_turn_mode="whole",
            sources=[SourceConfig(path=str(data), name="chats", weight=2.0)],
        )
    )
    report = analyze(config)
    assert report["samples"]["dropped_by_reason"] == {
        "template_not_prefix_stable": 6
    }  # 3 records, twice each
    drops = report["dropped_samples"]
    assert [(drop["ref"], drop["times"]) for drop in drops] == [
        ("chats:1", 2),
        ("chats:2", 2),
        ("chats:3", 2),
    ]
    assert drops[0]["where"] == f"record 1 of {data}"
    assert (
        drops[0]["reason"] == "template_not_prefix_stable" and "first differing token" in drops[0]["detail"]
    )
    assert json.loads(json.dumps(report)) == report  # JSON-ready


def test_dropped_samples_are_listed_per_reason_up_to_a_bound():
    drops = [
        {
            "ref": f"chats:{n}",
            "where": f"record {n} of chats.jsonl",
            "reason": "too_long",
            "detail": "long",
            "times": 1,
        }
        for n in range(5)
    ]
    drops.append({**drops[0], "ref": "chats:9", "reason": "template_error", "times": 3})
    lines = format_drops(drops, max_listed=2)
    assert lines == [
        "  template_error: 1 record",
        "    chats:9 (record 0 of chats.jsonl) (x3 per epoch): long",
        "  too_long: 5 records",
        "    chats:0 (record 0 of chats.jsonl): long",
        "    chats:1 (record 1 of chats.jsonl): long",
        "    ... and 3 more (--json lists every one)",
    ]


def test_the_report_says_what_records_samples_and_rows_are():
    report = {
        "sources": [],
        "bad_records_by_reason": {},
        "samples": {
            "rendered": 3,
            "dropped": 0,
            "dropped_by_reason": {},
            "truncated": 0,
            "dropped_turns": 0,
            "with_dropped_turns": 0,
        },
        "dropped_samples": [],
        "turns": {"messages_histogram": {"2": 3}, "assistant_turns_mean": 1.0},
        "lengths": {
            "min": 1,
            "p50": 1,
            "p90": 1,
            "p99": 1,
            "max": 1,
            "mean": 1.0,
            "histogram": {"edges": [0, 1], "counts": [3]},
        },
        "tokens": {"total": 3, "supervised": 1, "supervised_ratio": 1 / 3},
        "packing": {
            "enabled": True,
            "max_length": 8,
            "rows": 1,
            "efficiency": 0.375,
            "buffer": 4,
            "samples_per_row": 3.0,
        },
    }
    text = format_report(report)
    assert TERMS in text
    assert "a record is one line or item of a source file" in TERMS.lower()
    assert "sample is one rendered conversation (or one assistant turn of it, data.multi_turn_mode" in TERMS
    assert "after weighting (repeats) and drops" in TERMS
    assert "row is one packed sequence" in TERMS


def test_html_goes_exactly_where_asked_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert html_path("preview.html") == tmp_path / "preview.html"
    assert html_path("out/sub/p.html") == tmp_path / "out" / "sub" / "p.html"
    assert html_path("pages/") == tmp_path / "pages" / "preview.html"  # a directory: preview.html inside
    (tmp_path / "existing").mkdir()
    assert html_path("existing") == tmp_path / "existing" / "preview.html"
    assert html_path(str(tmp_path / "abs.html")) == tmp_path / "abs.html"
