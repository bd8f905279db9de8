"""data.multi_turn_mode: a template that rewrites earlier turns (Qwen3-style reasoning templates) gives one sample per
assistant turn that supervises that turn exactly once, as rendered when it is generated; consistent templates keep
today's single sample bit for bit; per-turn samples pack and load as independent samples."""

from __future__ import annotations

import copy
import json

import pytest

from ift_dist.config import Config, ConfigError, DataConfig, SourceConfig, load_config
from ift_dist.data.contracts import (
    IGNORE_INDEX,
    Conversation,
    Dropped,
    Message,
    RenderedSample,
    SampleRef,
    TurnSamples,
)
from ift_dist.data.loader import build_loader
from ift_dist.data.pack import StreamingPacker
from ift_dist.data.render import Renderer, load_tokenizer
from ift_dist.data.report import analyze
from ift_dist.data.round_trip import supervised_turns
from ift_dist.data.sources import open_source

# Qwen3's rule, small: an assistant reply that is not the last message loses its <think> block.
QWEN3_LIKE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if not loop.last and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
REPLIES = [
    "<think>\nThe user greets me; greet back.\n</think>\n\nHello! How can I help?",
    "<think>\nTwo plus two is four.\n</think>\n\n2 + 2 = 4.",
    "<think>\nParis is the capital of France.\n</think>\n\nParis.",
]
USERS = ["Hi there", "What is 2 + 2?", "And the capital of France?"]
SYSTEM = "You are a careful assistant."


def reasoning_chat(index: int = 0) -> Conversation:
    messages = [Message("system", SYSTEM)]
    for user, reply in zip(USERS, REPLIES, strict=True):
        messages += [Message("user", user), Message("assistant", reply)]
    return Conversation(messages, SampleRef("chats", index))


def plain_chat() -> Conversation:
    """The same chat with the answers only (no thoughts)."""
    messages = [
        Message(m.role, m.content.split("\n\n")[-1]) if m.role == "assistant" else m
        for m in reasoning_chat().messages
    ]
    return Conversation(messages, SampleRef("chats", 2))


@pytest.fixture(scope="module")
def qwen_path(shared_dir):
    return shared_dir / "tokenizers" / "qwen2.5-instruct"


@pytest.fixture(scope="module")
def qwen3_like(qwen_path):
    tokenizer = load_tokenizer(qwen_path)
    tokenizer.chat_template = QWEN3_LIKE
    return tokenizer


def as_dicts(conversation: Conversation) -> list[dict]:
    return [message.to_dict() for message in conversation.messages]


def check_turn_samples(result, conversation: Conversation, tokenizer, template: str | None = None) -> None:
    """Sample k is the conversation up to assistant turn k exactly as the template renders it (the model's view when it
    generates turn k), its labels the ids of turn k's reply and end-of-turn token and IGNORE_INDEX everywhere else."""
    messages = as_dicts(conversation)
    turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    assert isinstance(result, TurnSamples) and result.dropped == []
    assert len(result.samples) == len(turns)
    options = {"chat_template": template} if template else {}
    for sample, turn in zip(result.samples, turns, strict=True):
        assert sample.ref == conversation.ref and sample.dropped_turns == 0 and not sample.truncated
        rendered = tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False, **options)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert sample.input_ids == ids
        prompt = tokenizer.apply_chat_template(
            messages[:turn], tokenize=False, add_generation_prompt=True, **options
        )
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert ids[:start] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        end = ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>"), start) + 1
        assert sample.labels == [IGNORE_INDEX] * start + ids[start:end] + [IGNORE_INDEX] * (len(ids) - end)


@pytest.mark.parametrize("mode", ["per_turn", "auto"])
def test_every_assistant_turn_is_supervised_once_as_rendered_when_generated(qwen3_like, mode):
    conversation = reasoning_chat()
    renderer = Renderer(qwen3_like, DataConfig(multi_turn_mode=mode))
    result = renderer.render(conversation)
    check_turn_samples(result, conversation, qwen3_like)
    supervised = [turn for sample in result.samples for turn in supervised_turns(sample, qwen3_like)]
    # Each turn once, with its own think block (what the model writes at that point), then <|im_end|>.
    assert supervised == [(reply, "<|im_end|>") for reply in REPLIES]
    for sample in result.samples:
        text = qwen3_like.decode(
            [t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label >= 0]
        )
        assert SYSTEM not in text and not any(user in text for user in USERS)
    # The history of the last sample is what inference shows: earlier replies without their thoughts.
    history = qwen3_like.decode(result.samples[-1].input_ids)
    assert "Hello! How can I help?" in history and "The user greets me" not in history
    assert renderer.stats["samples"] == renderer.stats["per_turn_samples"] == 3
    assert renderer.stats["per_turn_conversations"] == 1
    assert not any(key.startswith("dropped:") for key in renderer.stats)


def test_whole_mode_reports_the_record_as_before(qwen3_like):
    renderer = Renderer(qwen3_like, DataConfig(multi_turn_mode="whole"))
    result = renderer.render(reasoning_chat())
    assert isinstance(result, Dropped) and result.reason == "template_not_prefix_stable"
    assert result.detail.startswith("message 2: ")
    assert renderer.stats["dropped:template_not_prefix_stable"] == 1 and renderer.stats["samples"] == 0


def test_a_single_exchange_is_one_sample_in_auto_mode(qwen3_like):
    single = Conversation(reasoning_chat().messages[:3], SampleRef("chats", 1))
    auto = Renderer(qwen3_like, DataConfig()).render(single)
    whole = Renderer(qwen3_like, DataConfig(multi_turn_mode="whole")).render(single)
    assert isinstance(auto, RenderedSample) and auto == whole


def test_auto_keeps_the_single_sample_of_a_consistent_template(shared_dir, qwen_path):
    qwen = load_tokenizer(qwen_path)
    auto, whole = Renderer(qwen, DataConfig()), Renderer(qwen, DataConfig(multi_turn_mode="whole"))
    fastchat = open_source(SourceConfig(path=str(shared_dir / "data/fastchat/dummy_conversation.json")))
    records = [record for record in fastchat if isinstance(record, Conversation)][:40]
    conversations = [reasoning_chat(), plain_chat(), *records]
    assert sum(sum(m.role == "assistant" for m in c.messages) > 1 for c in conversations) > 10
    for conversation in conversations:
        ours, reference = auto.render(conversation), whole.render(conversation)
        assert isinstance(ours, RenderedSample), (conversation.ref, ours)
        assert (ours.input_ids, ours.labels) == (reference.input_ids, reference.labels)
    assert auto.stats == whole.stats and auto.stats["per_turn_conversations"] == 0


def test_real_qwen3_template_gives_one_sample_per_turn(shared_dir, qwen_path):
    templates = json.loads((shared_dir / "tokenizers" / "chat_templates.json").read_text())["templates"]
    template = templates["Qwen-Qwen3-0.6B"]["template"]
    tokenizer = load_tokenizer(qwen_path)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<think>", "</think>"]}, replace_extra_special_tokens=False
    )
    renderer = Renderer(tokenizer, DataConfig(chat_template=template))
    conversation = reasoning_chat()
    result = renderer.render(conversation)
    check_turn_samples(result, conversation, tokenizer, template)
    assert [turn for s in result.samples for turn in supervised_turns(s, tokenizer)] == [
        (reply, "<|im_end|>") for reply in REPLIES
    ]
    # Replies without thoughts: each turn, generated last, opens an empty think block, which is supervised with it.
    plain = plain_chat()
    result = renderer.render(plain)
    check_turn_samples(result, plain, tokenizer, template)
    replies = [m.content for m in plain.messages if m.role == "assistant"]
    assert [turn for s in result.samples for turn in supervised_turns(s, tokenizer)] == [
        ("<think>\n\n</think>\n\n" + reply, "<|im_end|>") for reply in replies
    ]


def test_a_turn_whose_history_is_too_long_is_dropped_not_moved_to_an_earlier_turn(qwen3_like):
    conversation = reasoning_chat()
    first_two = Renderer(qwen3_like, DataConfig(multi_turn_mode="per_turn")).render(conversation).samples[1]
    renderer = Renderer(qwen3_like, DataConfig(max_length=len(first_two), multi_turn_mode="per_turn"))
    result = renderer.render(conversation)
    assert isinstance(result, TurnSamples) and len(result.samples) == 2
    assert [drop.reason for drop in result.dropped] == ["too_long"]
    assert result.dropped[0].detail.startswith("assistant turn 2 (message 6): ")
    assert [turn for s in result.samples for turn in supervised_turns(s, qwen3_like)] == [
        (reply, "<|im_end|>") for reply in REPLIES[:2]
    ]
    assert renderer.stats["dropped:too_long"] == 1 and renderer.stats["samples"] == 2


def test_a_template_whose_generation_prompt_disagrees_is_still_reported_in_auto_mode(qwen_path):
    # DeepSeek-R1 style: the generation prompt opens <think>; no per-turn sample can be masked either.
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
    )
    renderer = Renderer(load_tokenizer(qwen_path), DataConfig(chat_template=template))
    result = renderer.render(plain_chat())
    assert isinstance(result, Dropped) and result.reason == "template_not_prefix_stable"
    assert "generation prompt" in result.detail
    assert renderer.stats["per_turn_conversations"] == 0


def test_per_turn_needs_assistant_supervision(qwen3_like):
    with pytest.raises(ConfigError, match=r"data\.multi_turn_mode"):
        load_config(None, ["data.multi_turn_mode=per_turn", "data.supervise=all"])
    assert load_config(None, ["data.multi_turn_mode=per_turn"]).data.multi_turn_mode == "per_turn"
    # last_assistant supervises one turn already, the last, which no later turn rewrites: one whole sample.
    sample = Renderer(qwen3_like, DataConfig(supervise="last_assistant")).render(reasoning_chat())
    assert isinstance(sample, RenderedSample)
    assert supervised_turns(sample, qwen3_like) == [(REPLIES[-1], "<|im_end|>")]


def test_per_turn_samples_pack_as_independent_samples(qwen3_like):
    samples = []
    for index in range(4):
        samples += (
            Renderer(qwen3_like, DataConfig(multi_turn_mode="per_turn")).render(reasoning_chat(index)).samples
        )
    packer = StreamingPacker(max_length=512, buffer_size=8)
    for number, sample in enumerate(samples):
        packer.add(sample, (0, number // 3))  # the turns of one record share its position
    packer.flush()
    rows = [packer.pop() for _ in range(packer.ready)]
    assert sum(len(row.seq_lens) for row in rows) == len(samples) and any(
        len(row.seq_lens) > 1 for row in rows
    )
    packed = sorted(
        (tuple(row.input_ids[start : start + length]), tuple(row.labels[start + 1 : start + length]))
        for row in rows
        for start, length in zip(
            [sum(row.seq_lens[:n]) for n in range(len(row.seq_lens))], row.seq_lens, strict=True
        )
    )
    assert packed == sorted((tuple(s.input_ids), tuple(s.labels[1:])) for s in samples)
    for row in rows:  # no label crosses into the next sample
        starts = [sum(row.seq_lens[:n]) for n in range(len(row.seq_lens))]
        assert all(row.labels[start] == IGNORE_INDEX for start in starts)


def test_per_turn_samples_load_and_are_counted_in_the_report(tmp_path, qwen_path):
    data = tmp_path / "chats.jsonl"
    records = [{"messages": as_dicts(reasoning_chat())}] * 3 + [{"messages": as_dicts(reasoning_chat())[:3]}]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    config = Config(
        data=DataConfig(
            tokenizer=str(qwen_path),
            chat_template=QWEN3_LIKE,
            max_length=512,
            sources=[SourceConfig(path=str(data), name="chats", weight=2.0)],
        )
    )
    tokenizer = load_tokenizer(qwen_path)
    rows = []
    report = analyze(config, on_row=rows.append, tokenizer=tokenizer)
    samples = report["samples"]
    # 3 multi-turn records x 2 (weight) become 3 samples each; the single exchange stays one sample.
    assert samples["per_turn_conversations"] == 6 and samples["per_turn_samples"] == 18
    assert samples["rendered"] == 18 + 2 and samples["dropped"] == 0
    supervised = []
    for row in rows:
        start = 0
        for length in row.seq_lens:
            sample = RenderedSample(
                row.input_ids[start : start + length], row.labels[start : start + length], None
            )
            supervised += [reply for reply, _ in supervised_turns(sample, tokenizer)]
            start += length
    assert sorted(supervised) == sorted(REPLIES * 6 + [REPLIES[0]] * 2)


def test_the_loader_restores_per_turn_samples_and_counts(tmp_path, qwen_path):
    data = tmp_path / "chats.jsonl"
    records = [{"messages": as_dicts(reasoning_chat())}] * 4
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    cfg = DataConfig(
        chat_template=QWEN3_LIKE,
        max_length=256,
        pack_buffer=2,
        num_workers=0,
        sources=[SourceConfig(path=str(data), name="chats")],
    )
    tokenizer = load_tokenizer(qwen_path)

    def loader():
        return build_loader(cfg, tokenizer, rank=0, world_size=1, rows_per_batch=1, epochs=1)

    reference = [batch.input_ids.tolist() for batch in loader()]
    first = loader()
    batches = iter(first)
    seen = [next(batches).input_ids.tolist() for _ in range(3)]
    state = first.state_dict()
    assert first.report()["per_turn"] == {"conversations": 2, "samples": 6}
    older = copy.deepcopy(state)
    del older["counters"][
        "per_turn"
    ]  # a state saved before per-turn samples existed: counted from the restore
    for saved, counted in ((state, 4), (older, 2)):
        restored = loader()
        restored.load_state_dict(saved)
        assert seen + [batch.input_ids.tolist() for batch in restored] == reference
        assert restored.report()["per_turn"] == {"conversations": counted, "samples": 3 * counted}
        assert restored.report()["samples"] == 12
