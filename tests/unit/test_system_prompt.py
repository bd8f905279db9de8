"""data.system_prompt: the system message of every conversation without one, written into the run's chat template,
so training samples, the sample prompts (Renderer.generation_prompt, used by sample_prompts.answer_prompts) and the exported
tokenizer all prompt the same way. Under the demo's settings no SmolLM2 sample or prompt carries SmolLM2's own default
system prompt, which names another assistant than the identity the demo teaches."""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import pytest
import torch
from tiny_model import tiny_llama
from transformers import AutoTokenizer, LlamaForCausalLM

from ift_dist import export as export_lib
from ift_dist import sample_prompts
from ift_dist.config import Config, DataConfig, SourceConfig, load_config
from ift_dist.data.contracts import IGNORE_INDEX, Conversation, Dropped, Message, RenderedSample, SampleRef
from ift_dist.data.render import Renderer, load_tokenizer
from ift_dist.data.round_trip import round_trip_errors
from ift_dist.data.sources import open_source
from ift_dist.data.templates import with_system_prompt

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo_cpu.yaml"
SMOLLM2_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
EMPTY_SYSTEM = "<|im_start|>system\n<|im_end|>\n"


@pytest.fixture(scope="module")
def smollm2(shared_dir):
    return load_tokenizer(shared_dir / "tokenizers" / "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def demo() -> Config:
    return load_config(DEMO_CONFIG)


@pytest.fixture(scope="module")
def demo_conversations(demo) -> list[Conversation]:
    """Every record of the demo's sources (placeholders filled in) through the real records code; the config's paths
    are relative to the repository root."""
    conversations = []
    for source in demo.data.sources:
        located = dataclasses.replace(source, path=str(REPO / source.path))
        conversations += [record for record in open_source(located) if isinstance(record, Conversation)]
    return conversations


def prompt_text(sample: RenderedSample, tokenizer) -> str:
    """What precedes the first supervised token: the prompt the model was trained to answer."""
    first = next(index for index, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    return tokenizer.decode(sample.input_ids[:first], skip_special_tokens=False)


def chat(*messages: tuple[str, str]) -> Conversation:
    return Conversation([Message(role, content) for role, content in messages], SampleRef("test", 0))


def test_demo_samples_carry_an_empty_system_message_not_smollm2s_default(demo, demo_conversations, smollm2):
    assert demo.data.system_prompt == ""
    renderer = Renderer(smollm2, demo.data)
    identity = 0
    for conversation in demo_conversations:
        sample = renderer.render(conversation)
        if isinstance(sample, Dropped):  # a few long Alpaca records exceed data.max_length
            assert sample.reason == "too_long" and conversation.ref.source == "alpaca_en", sample
            continue
        text = smollm2.decode(sample.input_ids, skip_special_tokens=False)
        assert text.startswith(EMPTY_SYSTEM), text[:80]
        assert "SmolLM" not in text and "Hugging Face" not in text, text
        assert round_trip_errors(sample, conversation, smollm2, demo.data.supervise) == []
        identity += conversation.ref.source == "identity"
    assert identity == 91  # every identity record, with the name and author filled in
    # Without the setting SmolLM2's template injects its default, which is what the setting keeps out.
    plain = Renderer(smollm2, dataclasses.replace(demo.data, system_prompt=None)).render(
        demo_conversations[0]
    )
    assert SMOLLM2_DEFAULT in smollm2.decode(plain.input_ids)


def test_the_sample_prompt_is_the_prompt_training_renders(demo, demo_conversations, smollm2):
    renderer = Renderer(smollm2, demo.data)
    (question,) = demo.train.sample_prompts
    (record,) = [
        conversation
        for conversation in demo_conversations
        if conversation.ref.source == "identity" and conversation.messages[0].content == question
    ]
    assert "Nimbus" in record.messages[-1].content and "the ift-dist team" in record.messages[-1].content
    prompt = renderer.generation_prompt(question)
    assert prompt == prompt_text(renderer.render(record), smollm2)
    assert prompt == f"{EMPTY_SYSTEM}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def test_precedence_own_system_then_source_system_then_data_system_prompt(smollm2, tmp_path):
    data = tmp_path / "identity.json"
    data.write_text(
        '[{"instruction": "Who are you?", "output": "Ada."},'
        ' {"instruction": "Who are you?", "output": "Ada.", "system": "From the record."}]'
    )
    config = DataConfig(system_prompt="From the run.")
    renderer = Renderer(smollm2, config)

    def first_system(source: SourceConfig) -> list[str]:
        texts = []
        for record in open_source(source):
            sample = renderer.render(record)
            texts.append(smollm2.decode(sample.input_ids).split("<|im_end|>")[0])
        return texts

    assert first_system(SourceConfig(path=str(data))) == [
        "<|im_start|>system\nFrom the run.",
        "<|im_start|>system\nFrom the record.",
    ]
    assert first_system(SourceConfig(path=str(data), system="From the source.")) == [
        "<|im_start|>system\nFrom the source.",
        "<|im_start|>system\nFrom the record.",
    ]


@pytest.mark.parametrize("template", ["tokenizer", "chatml", "llama2"])
def test_system_prompt_renders_as_that_system_message_would(smollm2, template):
    """Rendering without a system message under data.system_prompt = rendering with it as the first message, for the
    tokenizer's Jinja template and compiled built-ins; text with Jinja and JSON syntax stays literal."""
    system = 'Be {{ brief }} %} "exact".\n'
    with_setting = Renderer(smollm2, DataConfig(template=template, system_prompt=system))
    explicit = Renderer(smollm2, DataConfig(template=template))
    exchange = [("user", "Hi"), ("assistant", "Hello."), ("user", "2+2?"), ("assistant", "4")]
    ours, reference = (
        with_setting.render(chat(*exchange)),
        explicit.render(chat(("system", system), *exchange)),
    )
    assert ours.input_ids == reference.input_ids and ours.labels == reference.labels
    own = chat(("system", "Mine."), *exchange)
    assert with_setting.render(own).input_ids == explicit.render(own).input_ids


def test_every_real_template_renders_the_system_prompt_as_a_system_message(shared_dir):
    """The preamble reassigns `messages` before the template runs: with each of the real templates of
    chat_templates.json that renders this chat at all, macros and loops included, the result is the template's own
    rendering of the chat with that system message first."""
    tokenizer = AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "qwen2.5-instruct")
    templates = json.loads((shared_dir / "tokenizers" / "chat_templates.json").read_text())["templates"]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    messages.append({"role": "user", "content": "2+2?"})
    system = 'Be {{ brief }} %} "exact".'
    compared = 0
    for name, entry in templates.items():
        template = entry["template"]
        render = partial(tokenizer.apply_chat_template, add_generation_prompt=True, tokenize=False)
        try:
            reference = render([{"role": "system", "content": system}, *messages], chat_template=template)
        except Exception:  # needs variables or tokens this chat does not give
            continue
        assert render(messages, chat_template=with_system_prompt(template, system)) == reference, name
        compared += 1
    assert compared >= 60


def small_llama() -> LlamaForCausalLM:
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
    model = tiny_llama(num_hidden_layers=1, max_position_embeddings=256, tie_word_embeddings=False, **sizes)
    return model.eval()


def test_answer_prompts_and_the_exported_tokenizer_prompt_as_training_does(demo, smollm2, tmp_path):
    cfg = dataclasses.replace(demo, train=dataclasses.replace(demo.train, sample_max_new_tokens=2))
    renderer = Renderer(smollm2, cfg.data)
    model = small_llama()
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True
    )
    (answer,) = sample_prompts.answer_prompts(model, smollm2, renderer, cfg, "sdpa", torch.device("cpu"))
    assert answer[0] == "Who are you?"
    expected = renderer.generation_prompt("Who are you?")
    assert smollm2.decode(seen[0], skip_special_tokens=False) == expected

    # The tokenizer an export carries (export.save_model_files) prompts the same way with a plain chat.
    export_lib.save_model_files(tmp_path, model, smollm2, renderer.chat_template)
    exported = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Who are you?"}]
    assert exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
