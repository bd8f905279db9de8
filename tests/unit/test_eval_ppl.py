"""Held-out perplexity (ift_dist.eval.ppl) on real records, the real SmolLM2 tokenizer and a tiny random Llama: the
loss and token count of the trainer's own eval (train.evaluate over the eval loader), every token's loss against the
model run on each rendered sample alone, per-source sums, bad and overlong records, 2 ranks == 1 rank (replicas, and
the lockstep that ZeRO-3 needs), and data_config_for."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_model import tiny_llama

from ift_dist.attention import enable_packed_attention
from ift_dist.config import ConfigError, DataConfig, SourceConfig, Template
from ift_dist.data.contracts import IGNORE_INDEX, BadRecordError, RenderedSample
from ift_dist.data.loader import build_loader
from ift_dist.data.render import Renderer, load_tokenizer
from ift_dist.data.sources import open_source
from ift_dist.eval.ppl import PerplexityResult, data_config_for, evaluate_perplexity, format_table
from ift_dist.loss import CausalLMLoss

SHARED = Path(__file__).resolve().parents[3] / "shared"
DATA = SHARED / "data"
SMOLLM2 = SHARED / "tokenizers" / "smollm2-135m-instruct"
MAX_LENGTH = 384


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(SMOLLM2))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Slices of real files: Alpaca records (JSON array) and FastChat multi-turn conversations (JSONL)."""
    directory = tmp_path_factory.mktemp("ppl")
    alpaca = json.loads((DATA / "llamafactory/alpaca_en_demo.json").read_text())[:14]
    (directory / "alpaca.json").write_text(json.dumps(alpaca))
    chat = json.loads((DATA / "fastchat/dummy_conversation.json").read_text())[:9]
    (directory / "chat.jsonl").write_text("".join(json.dumps(record) + "\n" for record in chat))
    return {"alpaca": directory / "alpaca.json", "chat": directory / "chat.jsonl"}


@pytest.fixture(scope="module")
def model():
    return tiny_llama(max_position_embeddings=1024).eval()


def data_for(paths, **overrides) -> DataConfig:
    base = DataConfig(max_length=MAX_LENGTH, num_workers=0, pack_buffer=8)
    for key, value in overrides.items():
        setattr(base, key, value)
    return data_config_for([str(path) for path in paths], base=base)


def trainers_eval(model, tokenizer, data: DataConfig, rows: int) -> dict:
    """train.evaluate, as training runs it: the model with packed attention inside CausalLMLoss, over the packed
    batches of the eval loader whose data.eval_sources are the files."""
    from ift_dist.train import evaluate

    packed = tiny_llama(max_position_embeddings=1024)
    packed.load_state_dict(model.state_dict())
    enable_packed_attention(packed, "sdpa")
    cfg = DataConfig(**{**vars(data), "eval_sources": list(data.sources), "sources": []})
    loader = build_loader(cfg, tokenizer, rank=0, world_size=1, rows_per_batch=rows, split="eval")
    engine = CausalLMLoss(packed, "reference")
    return evaluate(engine, loader, "sdpa", torch.device("cpu"), 0, tokenizer) | {"model": packed}


def test_equals_the_trainers_eval_loss_and_tokens(model, tokenizer, files):
    data = data_for(files.values())
    expected = trainers_eval(model, tokenizer, data, rows=2)
    stock = evaluate_perplexity(model, tokenizer, data, batch_rows=3, show_progress=False)
    packed = evaluate_perplexity(expected["model"], tokenizer, data, batch_rows=2, show_progress=False)
    for result in (stock, packed):
        assert result.tokens == expected["eval_tokens"] > 0
        assert result.loss == pytest.approx(expected["eval_loss"], rel=1e-5)
        assert result.perplexity == pytest.approx(expected["eval_perplexity"], rel=1e-5)
    assert stock.settings["attention"] == "stock" and not stock.settings["packing"]
    assert packed.settings["attention"] == "sdpa" and packed.settings["packing"]
    # Ten-odd random-model nats per token: the loss is a real cross-entropy over SmolLM2's 49,152 tokens.
    assert math.log(49152) - 1 < stock.loss < math.log(49152) + 1


def rendered(tokenizer, data: DataConfig, path: Path) -> list[RenderedSample]:
    renderer = Renderer(tokenizer, data)
    source = open_source(SourceConfig(path=str(path)))
    return [renderer.render(source.get(index)) for index in range(len(source))]


def test_every_supervised_token_is_scored_by_the_model_alone(model, tokenizer, files):
    """Independent of loaders and batching: each rendering run through the model on its own; only label != -100
    positions count, after the shift."""
    data = data_for([files["chat"]])
    samples = [
        sample for sample in rendered(tokenizer, data, files["chat"]) if isinstance(sample, RenderedSample)
    ]
    loss_sum, tokens, prompt_tokens = 0.0, 0, 0
    with torch.no_grad():
        for sample in samples:
            logits_TV = model(torch.tensor([sample.input_ids])).logits[0]
            targets_T = torch.tensor([*sample.labels[1:], IGNORE_INDEX])
            loss_sum += float(
                F.cross_entropy(logits_TV, targets_T, ignore_index=IGNORE_INDEX, reduction="sum")
            )
            tokens += sum(label != IGNORE_INDEX for label in sample.labels)
            prompt_tokens += sum(label == IGNORE_INDEX for label in sample.labels)
    result = evaluate_perplexity(model, tokenizer, data, batch_rows=4, show_progress=False)
    assert result.samples == len(samples) == 9
    assert result.tokens == tokens and prompt_tokens > 0
    assert result.loss == pytest.approx(loss_sum / tokens, rel=1e-5)
    everything = evaluate_perplexity(model, tokenizer, data_for([files["chat"]], supervise="all"),
                                     show_progress=False)  # fmt: skip
    assert everything.tokens == tokens + prompt_tokens - len(
        samples
    )  # the first token of a sample is no target


def test_one_records_tokens_are_its_assistant_labels(model, tokenizer, files, tmp_path):
    record = json.loads(files["chat"].read_text().splitlines()[2])
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(record) + "\n")
    data = data_for([path])
    (sample,) = rendered(tokenizer, data, path)
    result = evaluate_perplexity(model, tokenizer, data, show_progress=False)
    assert result.tokens == sum(label != IGNORE_INDEX for label in sample.labels)
    # Exactly the assistant replies and their end-of-turn markers.
    replies = [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
    supervised = tokenizer.decode([label for label in sample.labels if label != IGNORE_INDEX])
    assert supervised.replace("<|im_end|>", "") == "".join(replies)
    assert supervised.count("<|im_end|>") == len(replies)


def test_per_source_sums_make_the_total(model, tokenizer, files):
    both = evaluate_perplexity(model, tokenizer, data_for(files.values()), batch_rows=2, show_progress=False)
    assert list(both.sources) == ["alpaca", "chat"]
    alone = {
        name: evaluate_perplexity(model, tokenizer, data_for([path]), show_progress=False)
        for name, path in files.items()
    }
    for name, entry in both.sources.items():
        assert entry["tokens"] == alone[name].tokens > 0
        assert entry["samples"] == alone[name].samples > 0
        assert entry["loss"] == pytest.approx(alone[name].loss, rel=1e-5)
        assert entry["perplexity"] == pytest.approx(math.exp(entry["loss"]), rel=1e-9)
    assert both.tokens == sum(entry["tokens"] for entry in both.sources.values())
    weighted = sum(entry["loss"] * entry["tokens"] for entry in both.sources.values()) / both.tokens
    assert both.loss == pytest.approx(weighted, rel=1e-9)
    assert alone["alpaca"].loss != pytest.approx(alone["chat"].loss, rel=1e-3)  # the sources are told apart
    table = format_table(both)
    alpaca = both.sources["alpaca"]
    assert (alpaca["records"], alpaca["samples"] + alpaca["dropped"], both.dropped) == (
        14,
        14,
        alpaca["dropped"],
    )
    assert f"| alpaca | {alpaca['samples']} |" in table and "| chat | 9 |" in table and "**total**" in table
    assert json.loads(json.dumps(both.to_json()))["sources"]["chat"]["tokens"] == entry["tokens"]


def test_bad_and_overlong_records_as_in_training(model, tokenizer, files, tmp_path):
    alpaca = [record for record in json.loads(files["alpaca"].read_text()) if len(record["output"]) < 600][:6]
    lines = [json.dumps(record) for record in alpaca]
    lines.insert(2, '{"instruction": "broken", ')
    long = {"instruction": "Repeat.", "input": "", "output": " ".join(["word"] * 600)}
    lines.append(json.dumps(long))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = evaluate_perplexity(model, tokenizer, data_for([path]), show_progress=False)
    entry = result.sources["mixed"]
    assert (entry["records"], entry["bad_records"], entry["dropped"], entry["samples"]) == (7, 1, 1, 6)
    assert (result.bad_records, result.dropped) == (1, 1)
    assert "1 records gave no sample" in format_table(result) and "1 bad records skipped" in format_table(
        result
    )
    truncated = evaluate_perplexity(
        model, tokenizer, data_for([path], overlong="truncate"), show_progress=False
    )
    assert truncated.samples == 7 and truncated.tokens > result.tokens
    with pytest.raises(BadRecordError, match="line 3"):
        evaluate_perplexity(model, tokenizer, data_for([path], on_bad_record="error"), show_progress=False)


def test_no_sample_is_an_error(model, tokenizer, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"instruction": "x " * 500, "output": "y"}) + "\n")
    with pytest.raises(ValueError, match="no record of long gave a sample"):
        evaluate_perplexity(model, tokenizer, data_for([path]), show_progress=False)


def test_raw_text_files_score_every_token_of_each_chunk(model, tokenizer, files, tmp_path):
    """--text: documents read as training's text sources: the tokenizer's ids with EOS appended, cut into max_length
    chunks, every position after a chunk's first scored; here computed independently, chunk by chunk."""
    texts = [
        f"Document {n}: " + "the quick brown fox jumps over the lazy dog. " * (3 + 9 * n) for n in range(3)
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    max_length = 64
    loss_sum, tokens, chunks = 0.0, 0, 0
    with torch.no_grad():
        for text in texts:
            ids = [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]
            for start in range(0, len(ids), max_length):
                chunk = torch.tensor([ids[start : start + max_length]])
                if chunk.shape[1] < 2:
                    continue
                logits_TV = model(chunk).logits[0, :-1]
                loss_sum += float(F.cross_entropy(logits_TV, chunk[0, 1:], reduction="sum"))
                tokens, chunks = tokens + chunk.shape[1] - 1, chunks + 1
    data = data_config_for(
        [str(files["chat"])], text_files=[str(path)], base=DataConfig(max_length=max_length, num_workers=0)
    )
    assert [(source.name, source.format) for source in data.sources] == [("chat", "auto"), ("docs", "text")]
    result = evaluate_perplexity(model, tokenizer, data, batch_rows=3, show_progress=False)
    docs = result.sources["docs"]
    assert chunks > len(texts) and (docs["samples"], docs["tokens"]) == (chunks, tokens)
    assert docs["loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)
    assert result.sources["chat"]["tokens"] > 0  # records and raw text in one call
    only_text = data_config_for([], text_files=[str(path)], base=DataConfig(max_length=max_length))
    assert [source.format for source in only_text.sources] == ["text"]
    with pytest.raises(ConfigError, match="no files"):
        data_config_for([], text_files=[])


def test_data_config_for_takes_the_runs_data_section_and_overrides(tmp_path):
    base = DataConfig(
        sources=[SourceConfig(path="train.jsonl", weight=2.0)],
        eval_fraction=0.1,
        template="chatml",
        system_prompt="Answer briefly.",
        supervise="last_assistant",
        max_length=300,
        on_bad_record="error",
    )
    data = data_config_for(["held/out.jsonl", "more.json"], base=base)
    assert [(source.path, source.name, source.format) for source in data.sources] == [
        ("held/out.jsonl", "out", "auto"),
        ("more.json", "more", "auto"),
    ]
    assert (data.template, data.system_prompt, data.supervise) == (
        "chatml",
        "Answer briefly.",
        "last_assistant",
    )
    assert (data.max_length, data.on_bad_record, data.eval_fraction, data.eval_sources) == (
        300,
        "error",
        0.0,
        [],
    )
    assert isinstance(data.template, Template)
    assert base.sources[0].path == "train.jsonl" and base.eval_fraction == 0.1  # the base is left as it was

    chosen = data_config_for(["a/x.jsonl", "b/x.jsonl"], base=base, template="llama3", max_length=512,
                             tokenizer="tok")  # fmt: skip
    assert (chosen.template, chosen.max_length, chosen.tokenizer) == ("llama3", 512, "tok")
    assert [source.name for source in chosen.sources] == ["a/x", "b/x"]  # one stem, two sources

    defaults = data_config_for(["x.jsonl"])
    assert (defaults.template, defaults.system_prompt, defaults.max_length) == ("tokenizer", None, 2048)
    jinja = DataConfig(chat_template="{{ messages }}")
    assert data_config_for(["x.jsonl"], base=jinja).chat_template == "{{ messages }}"
    assert data_config_for(["x.jsonl"], base=jinja, template="chatml").chat_template is None
    with pytest.raises(ConfigError, match=r"data\.template"):
        data_config_for(["x.jsonl"], template="nope")
    with pytest.raises(ConfigError, match=r"data\.max_length"):
        data_config_for(["x.jsonl"], max_length=4)
    with pytest.raises(ConfigError, match="x/y"):
        data_config_for(["a/x/y.jsonl", "b/x/y.jsonl"])


def test_to_json_writes_null_for_a_source_without_tokens():
    result = PerplexityResult(
        sources={"empty": {"loss": math.nan, "perplexity": math.nan, "tokens": 0, "samples": 0}},
        loss=1.0,
        perplexity=math.e,
        tokens=3,
        samples=1,
    )
    record = result.to_json()
    assert record["sources"]["empty"]["loss"] is None and record["loss"] == 1.0
    assert "| empty | 0 | 0 | n/a | n/a |" in format_table(result)


# --------------------------------------------------------------------------------------------- two ranks


def _rank_main(rank: int, port: int, paths: list[str], synced: bool, results) -> None:
    import torch.distributed as torch_dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        tokenizer = load_tokenizer(str(SMOLLM2))
        model = tiny_llama(max_position_embeddings=1024).eval()
        if synced:
            enable_packed_attention(model, "sdpa")
        forwards = []
        model.base_model.register_forward_pre_hook(lambda module, args: forwards.append(1))
        result = evaluate_perplexity(
            model, tokenizer, data_for(paths, packing=False), batch_rows=1, synced=synced, show_progress=False
        )
        results.put((rank, (len(forwards), result.to_json())))
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("synced", [False, True], ids=["replicas", "lockstep"])
def test_two_ranks_equal_one(model, tokenizer, files, tmp_path, synced):
    """Each rank scores its share of the records; the sums over ranks are the one-rank result. 9 + 4 records in rows
    of one sample: 7 and 6. In lockstep the rank with fewer runs an idle forward until the other is done."""
    short = [record for record in json.loads(files["alpaca"].read_text()) if len(record["output"]) < 600][:4]
    (tmp_path / "short.json").write_text(json.dumps(short))
    paths = [str(files["chat"]), str(tmp_path / "short.json")]
    expected = evaluate_perplexity(model, tokenizer, data_for(paths, packing=False), show_progress=False)
    assert (expected.samples, expected.dropped) == (13, 0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ranks = [
        context.Process(target=_rank_main, args=(rank, port, paths, synced, results)) for rank in range(2)
    ]
    for process in ranks:
        process.start()
    forwards_and_outputs = dict(results.get(timeout=120) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
        assert process.exitcode == 0
    forwards = {rank: count for rank, (count, _) in forwards_and_outputs.items()}
    outputs = {rank: output for rank, (_, output) in forwards_and_outputs.items()}
    assert forwards == ({0: 7, 1: 7} if synced else {0: 7, 1: 6})
    assert outputs[0] == outputs[1]  # every rank returns the totals
    assert (outputs[0]["tokens"], outputs[0]["samples"]) == (expected.tokens, 13)
    assert outputs[0]["loss"] == pytest.approx(expected.loss, rel=1e-5)
    for name, entry in expected.sources.items():
        assert outputs[0]["sources"][name]["tokens"] == entry["tokens"]
        assert outputs[0]["sources"][name]["loss"] == pytest.approx(entry["loss"], rel=1e-5)
