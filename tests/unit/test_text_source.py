"""Raw-text sources (format text): parsing and bad records, rendering without a chat template (every token supervised,
EOS appended), max_length chunks, packed == unpacked next to chat samples on a tiny random Llama, mixing weights,
an exact loader resume, and the data report's per-source token counts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from tiny_model import tiny_llama

from ift_dist.attention import enable_packed_attention, packed_forward_kwargs
from ift_dist.config import Config, DataConfig, SourceConfig
from ift_dist.data.contracts import (
    IGNORE_INDEX,
    BadRecord,
    BadRecordError,
    DataFileError,
    SampleRef,
    TextDocument,
    TextSamples,
)
from ift_dist.data.loader import build_loader, merge_states
from ift_dist.data.render import Renderer, load_tokenizer
from ift_dist.data.report import analyze
from ift_dist.data.scan import scan_sources
from ift_dist.data.sources import open_source
from ift_dist.data.text_source import render_document
from ift_dist.data.views import format_report

TOKENIZERS = Path(__file__).resolve().parents[3] / "shared" / "tokenizers"
LONG = " ".join(f"Sentence {number} of a long document about rivers and hills." for number in range(40))


@pytest.fixture(scope="module")
def gpt2():
    tokenizer = load_tokenizer(str(TOKENIZERS / "gpt2"))
    assert not tokenizer.chat_template  # the point: a base model's tokenizer
    return tokenizer


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(str(TOKENIZERS / "smollm2-135m-instruct"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_rows(count: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Name {n}?"},
                {"role": "assistant", "content": f"It is {n}."},
            ]
        }
        for n in range(count)
    ]


def text_rows(count: int) -> list[dict]:
    return [{"text": f"Document {n}: " + LONG[: 150 + 90 * n]} for n in range(count)]


def chats_and_documents(directory: Path, chats: int, documents: int) -> list[SourceConfig]:
    """A chat source (chats.jsonl) and a text source (docs.jsonl) written into `directory`."""
    chat_path = write_jsonl(directory / "chats.jsonl", chat_rows(chats))
    doc_path = write_jsonl(directory / "docs.jsonl", text_rows(documents))
    return [SourceConfig(path=str(chat_path)), SourceConfig(path=str(doc_path), format="text")]


# --------------------------------------------------------------------------------------------- parsing


def test_jsonl_rows_become_documents(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "First."}, {"text": "Second.", "id": 7}])
    source = open_source(SourceConfig(path=str(path), format="text"))
    assert source.formats == {str(path): "text"}
    assert source.get(1) == TextDocument("Second.", SampleRef("docs", 1))
    assert source.scan().valid_indices.tolist() == [0, 1]


def test_a_custom_field_names_the_text_in_parquet_too(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["Alpha.", "Beta."], "url": ["a", "b"]}), path)
    source = open_source(SourceConfig(path=str(path), format="text", columns={"text": "content"}))
    assert [source.get(index).text for index in range(2)] == ["Alpha.", "Beta."]


def test_bad_records_name_file_line_and_field(tmp_path):
    rows = [{"content": "fine"}, {"content": ""}, {"content": "  \n"}, {"text": "wrong key"}, {"content": 3}]
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    config = SourceConfig(path=str(path), format="text", columns={"text": "content"})
    scan = open_source(config).scan()
    assert scan.valid_indices.tolist() == [0]
    found = [(bad.reason, bad.location, bad.field) for bad in scan.bad]
    assert found == [
        ("empty_text", "line 2", "content"),
        ("empty_text", "line 3", "content"),
        ("missing_field", "line 4", "content"),
        ("wrong_type", "line 5", "content"),
    ]
    assert all(bad.file == str(path) for bad in scan.bad)
    assert str(scan.bad[0]) == f"{path}, line 2, field content: the document is empty [empty_text]"
    with pytest.raises(BadRecordError, match=r"docs.jsonl, line 2, field content"):
        scan_sources([config], on_bad_record="error")


def test_text_is_never_detected(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "Only text."}])
    with pytest.raises(DataFileError, match=r"set format: to one of .*text"):
        open_source(SourceConfig(path=str(path)))


# --------------------------------------------------------------------------------------------- rendering


def test_a_document_is_its_plain_tokens_and_eos_all_supervised(gpt2):
    cfg = DataConfig(sources=[SourceConfig(path="unused", format="text")], max_length=512)
    renderer = Renderer(gpt2, cfg)  # no chat template needed when every source is text
    assert renderer.chat_template is None
    assert renderer.generation_prompt("Rivers") == "Rivers"  # sample prompts continue plain text
    text = "Rivers run to the sea."
    result = renderer.render(TextDocument(text, SampleRef("docs", 0)))
    assert isinstance(result, TextSamples) and len(result.samples) == 1
    sample = result.samples[0]
    assert sample.input_ids == gpt2(text)["input_ids"] + [gpt2.eos_token_id]
    assert sample.labels == [IGNORE_INDEX, *sample.input_ids[1:]]
    assert renderer.stats["text_documents"] == 1 and renderer.stats["samples"] == 1


def test_no_chat_template_text_next_to_chat_samples(smollm2):
    cfg = DataConfig(sources=[SourceConfig(path="a", format="text"), SourceConfig(path="b")])
    renderer = Renderer(smollm2, cfg)
    assert renderer.chat_template  # a chat source needs it
    sample = renderer.render(TextDocument("Rivers run to the sea.", SampleRef("docs", 0))).samples[0]
    # No template text around it (no <|im_start|>); the tokenizer's EOS (an instruct tokenizer's: <|im_end|>) closes it.
    assert smollm2.decode(sample.input_ids) == f"Rivers run to the sea.{smollm2.eos_token}"


def test_a_long_document_is_cut_into_consecutive_chunks(gpt2):
    ids = gpt2(LONG)["input_ids"] + [gpt2.eos_token_id]
    document = TextDocument(LONG, SampleRef("docs", 4))
    for max_length in (16, 33, len(ids) - 1, len(ids)):
        result = render_document(document, gpt2, max_length)
        chunks = [sample.input_ids for sample in result.samples]
        assert all(len(chunk) <= max_length for chunk in chunks)
        assert [token for chunk in chunks for token in chunk] == ids[: len(ids) - result.unsupervised_tail]
        for sample in result.samples:
            assert sample.labels == [IGNORE_INDEX, *sample.input_ids[1:]] and sample.ref == document.ref
    # A last chunk of one token has no target: no sample, counted.
    one_over = render_document(document, gpt2, len(ids) - 1)
    assert [len(s) for s in one_over.samples] == [len(ids) - 1] and one_over.unsupervised_tail == 1
    assert len(render_document(document, gpt2, 16).samples) == -(-len(ids) // 16) - (len(ids) % 16 == 1)


# --------------------------------------------------------------------------------------------- packing


def summed_loss(logits_TV: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
    """Cross entropy summed over supervised tokens, position t predicting labels[t + 1]."""
    return F.cross_entropy(logits_TV[:-1].float(), labels_T[1:], ignore_index=IGNORE_INDEX, reduction="sum")


def test_text_and_chat_packed_equal_unpacked(tmp_path, smollm2):
    cfg = DataConfig(
        sources=chats_and_documents(tmp_path, 5, 4),
        max_length=96,
        pack_buffer=32,
        num_workers=0,
        shuffle=False,
    )
    loader = build_loader(cfg, smollm2, rank=0, world_size=1, rows_per_batch=2, epochs=1)
    batches = list(loader)
    mixed = [
        refs for batch in batches for refs in batch.refs if {ref.source for ref in refs} == {"chats", "docs"}
    ]
    assert mixed, "no row packs text next to chat"
    text_counts = loader.report()["text"]
    assert text_counts["documents"] == 4 and text_counts["chunks"] > 4  # some documents were cut

    assert len(smollm2) == 49152  # tiny_llama's default vocabulary is SmolLM2's
    model = tiny_llama().float().eval()
    model.set_attn_implementation("sdpa")
    alone = []
    with torch.no_grad():
        for batch in batches:
            for row, lengths in enumerate(batch.seq_lens):
                start = 0
                for length in lengths:
                    ids_1T = batch.input_ids[row : row + 1, start : start + length]
                    logits_TV = model(input_ids=ids_1T, use_cache=False).logits[0]
                    alone.append(
                        (logits_TV, summed_loss(logits_TV, batch.labels[row, start : start + length]))
                    )
                    start += length
        enable_packed_attention(model, "sdpa")
        number, text_targets = 0, 0
        for batch in batches:
            logits_BTV = model(**packed_forward_kwargs(batch, "sdpa")).logits
            for row, (lengths, refs) in enumerate(zip(batch.seq_lens, batch.refs, strict=True)):
                start = 0
                for length, ref in zip(lengths, refs, strict=True):
                    labels_T = batch.labels[row, start : start + length]
                    logits_TV = logits_BTV[row, start : start + length]
                    expected_logits, expected_loss = alone[number]
                    torch.testing.assert_close(logits_TV, expected_logits, atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(
                        summed_loss(logits_TV, labels_T), expected_loss, atol=1e-4, rtol=1e-5
                    )
                    if ref.source == "docs":  # every token but the sample's first is a target
                        assert labels_T[0] == IGNORE_INDEX
                        assert (
                            labels_T[1:].tolist() == batch.input_ids[row, start + 1 : start + length].tolist()
                        )
                        text_targets += length - 1
                    start += length
                    number += 1
    assert number == len(alone) and text_targets > 0


# --------------------------------------------------------------------------------------------- mixing, resume


def test_weights_mix_text_like_any_source(tmp_path, smollm2):
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(6))
    docs = write_jsonl(tmp_path / "docs.jsonl", text_rows(3))
    cfg = DataConfig(
        sources=[
            SourceConfig(path=str(chats), weight=0.5),
            SourceConfig(path=str(docs), format="text", weight=2.0),
        ],
        max_length=1024,
        num_workers=0,
    )
    loader = build_loader(cfg, smollm2, rank=0, world_size=1, rows_per_batch=4, epochs=1)
    refs = Counter(ref for batch in loader for row in batch.refs for ref in row)
    assert {ref.index: n for ref, n in refs.items() if ref.source == "docs"} == {0: 2, 1: 2, 2: 2}
    chat_counts = [n for ref, n in refs.items() if ref.source == "chats"]
    assert chat_counts == [1, 1, 1]  # a seeded half of 6


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly_inside_a_cut_document(tmp_path, smollm2, num_workers):
    cfg = DataConfig(
        sources=chats_and_documents(tmp_path, 4, 4),
        max_length=48,
        pack_buffer=3,
        num_workers=num_workers,
        seed=5,
    )

    def loader():
        return build_loader(cfg, smollm2, rank=0, world_size=1, rows_per_batch=1)

    def batches(iterator, count):
        return [
            (b.input_ids.tolist(), b.labels.tolist(), b.position_ids.tolist(), b.seq_lens, b.refs)
            for _, b in zip(range(count), iterator, strict=False)  # range first: no batch is read past count
        ]

    expected = batches(iter(loader()), 12)
    cuts = 0
    for saved_after in (2, 4, 6, 8):
        first = loader()
        assert batches(iter(first), saved_after) == expected[:saved_after]
        state = first.state_dict()
        emitted = {str(ref) for *_, refs in expected[:saved_after] for row in refs for ref in row}
        cuts += any(ref.startswith("docs:") for ref in emitted & set(state["packer"]["refs"]))
        resumed = loader()
        resumed.load_state_dict(state)
        assert batches(iter(resumed), 12 - saved_after) == expected[saved_after:]
    assert cuts, "no save fell between two chunks of a document"


def test_states_merge_onto_another_world_size_when_a_rank_counted_no_document(tmp_path, smollm2):
    """A rank that has read no text document yet, or a state saved before text sources existed, has no text count:
    a resume on another number of ranks still merges the states, and the counts add up."""
    cfg = DataConfig(sources=chats_and_documents(tmp_path, 6, 6), max_length=48, pack_buffer=3, num_workers=0)
    loaders = [build_loader(cfg, smollm2, rank=rank, world_size=2, rows_per_batch=1) for rank in range(2)]
    for loader in loaders:
        for _, _batch in zip(range(4), loader, strict=False):
            pass
    states = [loader.state_dict() for loader in loaders]
    counted = sum(loader.report()["text"]["documents"] for loader in loaders)
    assert counted > 0
    untouched = states[0]["counters"].pop("text")
    merged = merge_states(states, 1)
    restored = build_loader(cfg, smollm2, rank=0, world_size=1, rows_per_batch=1)
    restored.load_state_dict(merged[0])
    assert restored.report()["text"]["documents"] == counted - untouched.get("documents", 0)


# --------------------------------------------------------------------------------------------- report


def test_the_data_report_counts_text_tokens_per_source(tmp_path, gpt2):
    docs = write_jsonl(tmp_path / "docs.jsonl", [*text_rows(3), {"text": ""}])
    config = Config(
        data=DataConfig(
            tokenizer=str(TOKENIZERS / "gpt2"),
            sources=[SourceConfig(path=str(docs), format="text", weight=2.0)],
            max_length=64,
        )
    )
    report = analyze(config)
    chunks = [
        render_document(TextDocument(row["text"], SampleRef("docs", n)), gpt2, 64).samples
        for n, row in enumerate(text_rows(3))
    ]
    tokens = 2 * sum(len(sample) for samples in chunks for sample in samples)
    (source,) = report["sources"]
    assert (source["format"], source["valid"], source["bad"]) == ("text", 3, 1)
    assert source["tokens"] == tokens == report["tokens"]["total"]
    assert source["supervised_tokens"] == tokens - 2 * sum(map(len, chunks))  # each chunk's first is context
    assert report["samples"]["text_documents"] == 6
    assert report["samples"]["text_chunks"] == report["samples"]["rendered"] == 2 * sum(map(len, chunks))
    assert report["turns"]["messages_histogram"] == {}
    text = format_report(report)
    assert "Raw text (format text): 6 documents" in text and str(tokens) in text
    assert json.loads(json.dumps(report)) == report
    assert isinstance(open_source(config.data.sources[0]).get(3), BadRecord)
