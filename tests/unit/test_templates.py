"""Built-in chat templates and their compilation to Jinja: exact strings, multi-turn, round trip, custom templates
declared in YAML, and the choice of template (tokenizer's own, override, built-in, custom)."""

from __future__ import annotations

import copy
import json

import pytest
from transformers import AutoTokenizer

from ift_dist.config import ConfigError, DataConfig, Template, TemplateSpec, load_config
from ift_dist.data.builtin_templates import (
    ALPACA_SYSTEM,
    GUANACO_SYSTEM,
    LLAMA2_SYSTEM,
    STABLEBELUGA_SYSTEM,
    VICUNA_SYSTEM,
    YAYI_SYSTEM,
)
from ift_dist.data.contracts import IGNORE_INDEX, Conversation, Dropped, Message, RenderedSample, SampleRef
from ift_dist.data.render import Renderer
from ift_dist.data.round_trip import round_trip_errors, supervised_turns
from ift_dist.data.templates import (
    BUILTIN_TEMPLATES,
    compile_template,
    end_of_turn_marker,
    resolve_chat_template,
)
from ift_dist.data.tool_text import as_text

STANFORD_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

# A two-exchange chat with a system prompt, and what each built-in renders for it (gpt2: bos = eos = <|endoftext|>).
CHAT = [
    Message("system", "Be brief."),
    Message("user", "Hi"),
    Message("assistant", "Hello."),
    Message("user", "2+2?"),
    Message("assistant", "4"),
]
E = "<|endoftext|>"
EXPECTED = {
    "alpaca": f"{E}Be brief.\n\n### Instruction:\nHi\n\n### Response:Hello.{E}\n\n"
    f"### Instruction:\n2+2?\n\n### Response:4{E}\n\n",
    "llama2": f"{E}[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. {E}{E}[INST] 2+2? [/INST] 4 {E}",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    "Hello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "llama3": f"{E}<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "Hello.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
    "phi3": f"{E}<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
    "<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n",
    "vicuna": f"{E}Be brief. USER: Hi ASSISTANT: Hello.{E}USER: 2+2? ASSISTANT: 4{E}",
    "stablebeluga": f"{E}### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello.{E}\n\n"
    f"### User:\n2+2?\n\n### Assistant:\n4{E}\n\n",
    "guanaco": f"{E}Be brief. ### Human: Hi ### Assistant: Hello.{E}### Human: 2+2? ### Assistant: 4{E}",
    "alpaca_no_preamble": f"{E}Be brief.\n\n### Instruction:\nHi\n\n### Response:Hello.{E}\n\n"
    f"### Instruction:\n2+2?\n\n### Response:4{E}\n\n",
    "llama2_default_system": f"{E}[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. {E}{E}[INST] 2+2? [/INST] 4 {E}",
    "firefly": f"{E}Be brief.{E}Hi{E}Hello.{E}2+2?{E}4{E}",
    "yayi": "<|System|>:\nBe brief.\n\n<|Human|>:\nHi\n\n<|YaYi|>:\nHello.\n\n<|End|>"
    "<|Human|>:\n2+2?\n\n<|YaYi|>:\n4\n\n<|End|>",
    "hermes": f"{E}Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello.{E}\n\n"
    f"### Instruction:\n2+2?\n\n### Response:\n4{E}\n\n",
    "linly": f"{E}System: Be brief.\nUser: Hi\nBot: Hello.{E}\nUser: 2+2?\nBot: 4{E}\n",
}
# The same chat without its system message: where a template has a default system prompt, it takes the place.
EXPECTED_NO_SYSTEM = {
    "llama2": f"{E}[INST] Hi [/INST] Hello. {E}{E}[INST] 2+2? [/INST] 4 {E}",
    "llama2_default_system": f"{E}[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\nHi [/INST] Hello. {E}"
    f"{E}[INST] 2+2? [/INST] 4 {E}",
    "stablebeluga": f"{E}### System:\n{STABLEBELUGA_SYSTEM}\n\n### User:\nHi\n\n### Assistant:\nHello.{E}\n\n"
    f"### User:\n2+2?\n\n### Assistant:\n4{E}\n\n",
    "guanaco": f"{E}{GUANACO_SYSTEM} ### Human: Hi ### Assistant: Hello.{E}### Human: 2+2? ### Assistant: 4{E}",
    "alpaca_no_preamble": f"{E}### Instruction:\nHi\n\n### Response:Hello.{E}\n\n"
    f"### Instruction:\n2+2?\n\n### Response:4{E}\n\n",
    "firefly": f"{E}Hi{E}Hello.{E}2+2?{E}4{E}",
    "yayi": f"<|System|>:\n{YAYI_SYSTEM}\n\n<|Human|>:\nHi\n\n<|YaYi|>:\nHello.\n\n<|End|>"
    "<|Human|>:\n2+2?\n\n<|YaYi|>:\n4\n\n<|End|>",
    "hermes": f"{E}### Instruction:\nHi\n\n### Response:\nHello.{E}\n\n### Instruction:\n2+2?\n\n### Response:\n4{E}\n\n",
    "linly": f"{E}User: Hi\nBot: Hello.{E}\nUser: 2+2?\nBot: 4{E}\n",
}
# The generation prompt each built-in ends with after a user turn (what inference appends).
GENERATION_PROMPT = {
    "alpaca": "### Response:",
    "llama2": " [/INST]",
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "phi3": "<|assistant|>\n",
    "vicuna": "ASSISTANT:",
    "stablebeluga": "### Assistant:\n",
    "guanaco": "### Assistant:",
    "alpaca_no_preamble": "### Response:",
    "llama2_default_system": " [/INST]",
    "firefly": f"2+2?{E}",  # none of its own: the user turn's eos ends the prompt
    "yayi": "<|YaYi|>:\n",
    "hermes": "### Response:\n",
    "linly": "Bot:",
}
# A tokenizer in which each built-in's end-of-turn marker is one special token, for the round trip.
NATIVE_TOKENIZER = {
    "alpaca": "gpt2",
    "llama2": "gpt2",
    "chatml": "qwen2.5-instruct",
    "llama3": "llama-3.1-instruct",
    "phi3": "phi-3-mini-4k-instruct",
    "vicuna": "gpt2",
    "stablebeluga": "gpt2",
    "guanaco": "gpt2",
    "alpaca_no_preamble": "gpt2",
    "llama2_default_system": "gpt2",
    # bos and eos differ here, so a user turn's closing token cannot pass for the reply's.
    "firefly": "llama-3.1-instruct",
    "yayi": "gpt2",
    "hermes": "gpt2",
    "linly": "gpt2",
}
# Tokens a format's own tokenizer adds as special tokens before training (YAYI's load_tokenizer).
YAYI_TOKENS = ("<|System|>", "<|Human|>", "<|YaYi|>", "<|End|>")
ADDED_TOKENS = {"yayi": YAYI_TOKENS}


@pytest.fixture(scope="module")
def tokenizers(shared_dir):
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / name)
        return cache[name]

    return get


def native_tokenizer(tokenizers, name: str):
    """The round-trip tokenizer of a built-in template, with the special tokens its format adds."""
    tokenizer = tokenizers(NATIVE_TOKENIZER[name])
    if name in ADDED_TOKENS:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_special_tokens(
            {"additional_special_tokens": list(ADDED_TOKENS[name])}, replace_extra_special_tokens=False
        )
    return tokenizer


def conversation(messages, index=0, tools=None) -> Conversation:
    return Conversation(list(messages), SampleRef("test", index), tools=tools)


def render_text(tokenizer, template: str, messages, **kwargs) -> str:
    dicts = []
    for message in messages:
        out = message.to_dict()
        if message.alpaca is not None and message.alpaca[1]:
            out["instruction"], out["input"] = message.alpaca
        dicts.append(out)
    return tokenizer.apply_chat_template(dicts, chat_template=template, tokenize=False, **kwargs)


def test_builtin_names_are_the_documented_ones():
    assert set(BUILTIN_TEMPLATES) == {
        "alpaca",
        "alpaca_no_preamble",
        "llama2",
        "llama2_default_system",
        "chatml",
        "llama3",
        "phi3",
        "vicuna",
        "stablebeluga",
        "guanaco",
        "firefly",
        "yayi",
        "hermes",
        "linly",
    }
    assert set(EXPECTED) == set(GENERATION_PROMPT) == set(NATIVE_TOKENIZER) == set(BUILTIN_TEMPLATES)


def test_alpaca_with_and_without_input_is_the_stanford_prompt(tokenizers):
    gpt2 = tokenizers("gpt2")
    template = compile_template(BUILTIN_TEMPLATES["alpaca"])
    with_input = [
        Message("user", "Translate.\n\nBonjour", alpaca=("Translate.", "Bonjour")),
        Message("assistant", "Hello"),
    ]
    expected = (
        E + STANFORD_WITH_INPUT.format(instruction="Translate.", input="Bonjour") + "Hello" + E + "\n\n"
    )
    assert render_text(gpt2, template, with_input) == expected
    without_input = [
        Message("user", "Name a color.", alpaca=("Name a color.", "")),
        Message("assistant", "Red"),
    ]
    expected = E + STANFORD_NO_INPUT.format(instruction="Name a color.") + "Red" + E + "\n\n"
    assert render_text(gpt2, template, without_input) == expected
    # The generation prompt at inference is the Stanford prompt itself.
    prompt = render_text(gpt2, template, with_input[:1], add_generation_prompt=True)
    assert prompt == E + STANFORD_WITH_INPUT.format(instruction="Translate.", input="Bonjour")


def test_alpaca_renderer_uses_the_input_prompt_for_alpaca_records(tokenizers):
    gpt2 = tokenizers("gpt2")
    renderer = Renderer(gpt2, DataConfig(template="alpaca"))
    record = conversation([Message("user", "Sum.\n\n1 2", alpaca=("Sum.", "1 2")), Message("assistant", "3")])
    sample = renderer.render(record)
    text = gpt2.decode(sample.input_ids)
    assert text.startswith(E + STANFORD_WITH_INPUT.format(instruction="Sum.", input="1 2"))
    assert supervised_turns(sample, gpt2) == [("3", E)]


@pytest.mark.parametrize(
    ("name", "response"), [("alpaca_no_preamble", "### Response:"), ("hermes", "### Response:\n")]
)
def test_alpaca_style_without_preamble_with_and_without_input(tokenizers, name, response):
    """Stanford's layout with no preamble: alpaca_no_preamble has Stanford's "### Response:" directly before the
    reply, hermes the newline of the Nous-Hermes model cards."""
    gpt2 = tokenizers("gpt2")
    template = compile_template(BUILTIN_TEMPLATES[name])
    with_input = [
        Message("user", "Translate.\n\nBonjour", alpaca=("Translate.", "Bonjour")),
        Message("assistant", "Hello"),
    ]
    expected = f"{E}### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n{response}Hello{E}\n\n"
    assert render_text(gpt2, template, with_input) == expected
    without_input = [
        Message("user", "Name a color.", alpaca=("Name a color.", "")),
        Message("assistant", "Red"),
    ]
    assert (
        render_text(gpt2, template, without_input)
        == f"{E}### Instruction:\nName a color.\n\n{response}Red{E}\n\n"
    )
    sample = Renderer(gpt2, DataConfig(template=name)).render(conversation(with_input))
    assert supervised_turns(sample, gpt2) == [("Hello", E)]


# The supervised token runs of CHAT, decoded, under each template's round-trip tokenizer: each reply with its
# end-of-turn marker (and what the format writes between them), nothing else.
SUPERVISED = {
    "alpaca_no_preamble": [f"Hello.{E}", f"4{E}"],
    "llama2_default_system": [f" Hello. {E}", f" 4 {E}"],
    "stablebeluga": [f"Hello.{E}", f"4{E}"],
    "guanaco": [f" Hello.{E}", f" 4{E}"],
    "firefly": ["Hello.<|eot_id|>", "4<|eot_id|>"],
    "yayi": ["Hello.\n\n<|End|>", "4\n\n<|End|>"],
    "hermes": [f"Hello.{E}", f"4{E}"],
    "linly": [f" Hello.{E}", f" 4{E}"],
}


@pytest.mark.parametrize("name", sorted(SUPERVISED))
def test_builtin_supervises_exactly_the_replies(tokenizers, name):
    tokenizer = native_tokenizer(tokenizers, name)
    for chat in (CHAT, CHAT[1:]):
        sample = Renderer(tokenizer, DataConfig(template=name)).render(conversation(chat))
        assert isinstance(sample, RenderedSample), sample
        runs, run = [], []
        for token, label in zip(sample.input_ids, sample.labels, strict=True):
            if label != IGNORE_INDEX:
                assert label == token
                run.append(token)
            elif run:
                runs.append(run)
                run = []
        runs += [run] if run else []
        assert [tokenizer.decode(run) for run in runs] == SUPERVISED[name]


def test_firefly_closes_every_segment_with_eos(tokenizers):
    """Firefly's "<s>input</s>target</s>": with a tokenizer whose bos and eos differ, every turn ends in eos, only bos
    opens the conversation, and each user turn's eos stays unsupervised."""
    llama = tokenizers("llama-3.1-instruct")
    sample = Renderer(llama, DataConfig(template="firefly")).render(conversation(CHAT))
    assert llama.decode(sample.input_ids) == (
        "<|begin_of_text|>Be brief.<|eot_id|>Hi<|eot_id|>Hello.<|eot_id|>2+2?<|eot_id|>4<|eot_id|>"
    )
    assert supervised_turns(sample, llama) == [("Hello.", "<|eot_id|>"), ("4", "<|eot_id|>")]


def test_yayi_end_token_closes_each_reply(tokenizers):
    """With YAYI's four tags added as special tokens (as YAYI does), each is one token and <|End|> is the marker."""
    tokenizer = native_tokenizer(tokenizers, "yayi")
    for tag in YAYI_TOKENS:
        assert len(tokenizer.encode(tag, add_special_tokens=False)) == 1
    renderer = Renderer(tokenizer, DataConfig(template="yayi"))
    sample = renderer.render(conversation(CHAT[1:]))
    assert tokenizer.decode(sample.input_ids).startswith(f"<|System|>:\n{YAYI_SYSTEM}\n\n<|Human|>:\nHi\n\n")
    assert [marker for _, marker in supervised_turns(sample, tokenizer)] == ["<|End|>", "<|End|>"]
    assert renderer.generation_prompt("2+2?").endswith("<|Human|>:\n2+2?\n\n<|YaYi|>:\n")


# Templates with a default system prompt, and the template that renders the same chat without it.
DEFAULT_SYSTEMS = {
    "alpaca": (ALPACA_SYSTEM, "alpaca_no_preamble"),
    "vicuna": (VICUNA_SYSTEM, None),
    "stablebeluga": (STABLEBELUGA_SYSTEM, None),
    "guanaco": (GUANACO_SYSTEM, None),
    "yayi": (YAYI_SYSTEM, None),
    "llama2_default_system": (LLAMA2_SYSTEM, "llama2"),
}


@pytest.mark.parametrize("name", sorted(DEFAULT_SYSTEMS))
def test_default_system_prompt_applies_only_without_system_and_system_prompt(tokenizers, name):
    """The default fills in for a conversation with no system message; the conversation's own system message and
    data.system_prompt replace it; data.system_prompt "" leaves it out."""
    default, without_default = DEFAULT_SYSTEMS[name]
    tokenizer = native_tokenizer(tokenizers, name)

    def text(chat, template: str = name, **settings) -> str:
        sample = Renderer(tokenizer, DataConfig(template=template, **settings)).render(conversation(chat))
        assert isinstance(sample, RenderedSample), sample
        return tokenizer.decode(sample.input_ids)

    assert default in text(CHAT[1:])
    assert default not in text(CHAT)
    mine = [Message("system", "Mine."), *CHAT[1:]]
    assert text(CHAT[1:], system_prompt="Mine.") == text(mine)
    removed = text(CHAT[1:], system_prompt="")
    assert default not in removed and "Hi" in removed
    if without_default is not None:
        assert removed == text(CHAT[1:], template=without_default)


def test_llama2_default_system_prompt_is_opt_in(tokenizers):
    """Meta no longer applies Llama-2's system prompt by default (meta-llama/llama UPDATES.md), nor does transformers
    (use_default_system_prompt=False): "llama2" renders none, "llama2_default_system" renders Meta's text."""
    gpt2 = tokenizers("gpt2")
    assert "<<SYS>>" not in render_text(gpt2, compile_template(BUILTIN_TEMPLATES["llama2"]), CHAT[1:])
    assert LLAMA2_SYSTEM == (
        "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
        "safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
        "content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question "
        "does not make any sense, or is not factually coherent, explain why instead of answering something not "
        "correct. If you don't know the answer to a question, please don't share false information."
    )
    prompt = render_text(
        gpt2,
        compile_template(BUILTIN_TEMPLATES["llama2_default_system"]),
        CHAT[1:2],
        add_generation_prompt=True,
    )
    assert prompt == f"{E}[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\nHi [/INST]"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_exact_multi_turn_text(tokenizers, name):
    gpt2 = tokenizers("gpt2")
    template = compile_template(BUILTIN_TEMPLATES[name])
    assert render_text(gpt2, template, CHAT) == EXPECTED[name]
    prompt = render_text(gpt2, template, CHAT[:4], add_generation_prompt=True)
    assert prompt.endswith(GENERATION_PROMPT[name])
    # The conversation so far plus the generation prompt is where the reply starts in the full text.
    assert EXPECTED[name].startswith(prompt)
    assert EXPECTED[name][len(prompt) :].lstrip().startswith("4")


@pytest.mark.parametrize("name", sorted(EXPECTED_NO_SYSTEM))
def test_builtin_exact_multi_turn_text_without_system(tokenizers, name):
    gpt2 = tokenizers("gpt2")
    template = compile_template(BUILTIN_TEMPLATES[name])
    assert render_text(gpt2, template, CHAT[1:]) == EXPECTED_NO_SYSTEM[name]
    prompt = render_text(gpt2, template, CHAT[1:4], add_generation_prompt=True)
    assert EXPECTED_NO_SYSTEM[name].startswith(prompt) and prompt.endswith(GENERATION_PROMPT[name])


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_round_trip_multi_turn(tokenizers, name):
    tokenizer = native_tokenizer(tokenizers, name)
    renderer = Renderer(tokenizer, DataConfig(template=name))
    chats = [
        conversation(CHAT, 0),
        conversation(CHAT[1:], 1),  # no system
        conversation(
            [
                Message("user", f"Question {n}?") if n % 2 == 0 else Message("assistant", f"Answer {n}.")
                for n in range(12)
            ],
            2,
        ),
    ]
    for chat in chats:
        sample = renderer.render(chat)
        assert isinstance(sample, RenderedSample), sample
        assert round_trip_errors(sample, chat, tokenizer, "assistant") == []
        # Every reply closes with the template's end-of-turn marker, one special token of this tokenizer.
        markers = {marker for _, marker in supervised_turns(sample, tokenizer)}
        assert markers == {end_of_turn_marker(BUILTIN_TEMPLATES[name], tokenizer)}
    assert renderer.stats["straddling_tokens"] == 0
    assert renderer.stats["turns_without_end_marker"] == 0


def test_builtin_renders_tools_and_tool_calls(tokenizers):
    qwen = tokenizers("qwen2.5-instruct")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    chat = conversation(
        [
            Message("user", "Weather in Paris?"),
            Message("assistant", "", tool_calls=[call]),
            Message("tool", '{"temp": 21}', name="get_weather"),
            Message("assistant", "21 degrees."),
        ],
        tools=tools,
    )
    renderer = Renderer(qwen, DataConfig(template="chatml"))
    sample = renderer.render(chat)
    text = qwen.decode(sample.input_ids)
    assert text.startswith(
        '<|im_start|>system\nYou can call these functions (JSON schemas, one per line):\n{"type": "function", '
        '"function": {"name": "get_weather", "parameters": {"type": "object"}}}<|im_end|>\n'
    )
    assert supervised_turns(sample, qwen) == [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "<|im_end|>"),
        ("21 degrees.", "<|im_end|>"),
    ]
    assert '<|im_start|>tool\n{"temp": 21}<|im_end|>\n' in text
    # Llama 3's JSON tool-call form.
    llama = tokenizers("llama-3.1-instruct")
    sample = Renderer(llama, DataConfig(template="llama3")).render(chat)
    assert supervised_turns(sample, llama)[0] == (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "<|eot_id|>",
    )


def test_custom_template_from_yaml(tmp_path, tokenizers):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n"
        "  template: custom\n"
        "  custom_template:\n"
        "    prefix: '{bos_token}'\n"
        '    system: "<|system|>{content}\\n"\n'
        '    user: "Q: {content}\\n"\n'
        "    assistant_prefix: 'A:'\n"
        "    assistant: ' {content}'\n"
        "    assistant_suffix: '{eos_token}'\n"
        '    separator: "\\n"\n'
    )
    cfg = load_config(path).data
    assert isinstance(cfg.custom_template, TemplateSpec)
    gpt2 = tokenizers("gpt2")
    renderer = Renderer(gpt2, cfg)
    chat = conversation(CHAT)
    sample = renderer.render(chat)
    assert gpt2.decode(sample.input_ids) == f"{E}<|system|>Be brief.\nQ: Hi\nA: Hello.{E}\nQ: 2+2?\nA: 4{E}\n"
    assert round_trip_errors(sample, chat, gpt2, "assistant") == []
    # The same Jinja text goes into the exported tokenizer, so inference renders the same prompt.
    assert renderer.chat_template == resolve_chat_template(gpt2, cfg)
    assert render_text(gpt2, renderer.chat_template, CHAT[:2], add_generation_prompt=True).endswith(
        "Q: Hi\nA:"
    )


def test_custom_template_bad_placeholder_names_the_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  template: custom\n  custom_template:\n    user: 'Q: {text}'\n")
    with pytest.raises(ConfigError, match=r"data\.custom_template\.user: unknown placeholder \{text\}"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"data\.template: 'zephyr' is not one of"):
        load_config(None, ["data.template=zephyr"])


def test_literal_braces_and_quotes_survive_compilation(tokenizers):
    spec = TemplateSpec(user='User said "{content}" {{literally}}\\n', assistant_suffix="{eos_token}")
    gpt2 = tokenizers("gpt2")
    text = render_text(
        gpt2, compile_template(spec), [Message("user", "it's {x}"), Message("assistant", "ok")]
    )
    assert text == 'User said "it\'s {x}" {literally}\\nok' + E


def test_resolve_prefers_override_then_tokenizer_then_errors(tokenizers):
    qwen = tokenizers("qwen2.5-instruct")
    assert resolve_chat_template(qwen, DataConfig()) == qwen.chat_template
    assert resolve_chat_template(qwen, DataConfig(chat_template="{{ messages }}")) == "{{ messages }}"
    assert "### Instruction" in resolve_chat_template(qwen, DataConfig(template="alpaca"))
    with pytest.raises(ConfigError, match=r"gpt2.*has no chat template.*data\.template"):
        resolve_chat_template(tokenizers("gpt2"), DataConfig())


def test_template_without_user_with_input_ignores_alpaca_fields(tokenizers):
    # chatml has no separate input slot: the joined content is used, exactly as for any other user turn.
    qwen = tokenizers("qwen2.5-instruct")
    renderer = Renderer(qwen, DataConfig(template="chatml"))
    chat = conversation([Message("user", "Sum.\n\n1 2", alpaca=("Sum.", "1 2")), Message("assistant", "3")])
    sample = renderer.render(chat)
    assert not isinstance(sample, Dropped)
    assert "<|im_start|>user\nSum.\n\n1 2<|im_end|>" in qwen.decode(sample.input_ids)


# ------------------------------------------------------------------------------------- real templates
# Real templates from chat_templates.json, each set onto a real tokenizer; where that tokenizer lacks the model's
# control tokens they are added as special tokens (as one does before fine-tuning into a new format). For each
# conversation kind: "ok" (then parity with apply_chat_template and the round trip are asserted) or the reason the
# sample is dropped. `prefix` is what the template itself puts before the reply inside the supervised span.

KINDS = ("single", "system_multi", "multi", "tools")
OK = {kind: "ok" for kind in KINDS}
DEEPSEEK_TOKENS = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
)
MISTRAL_TOKENS = ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                  "[TOOL_RESULTS]", "[/TOOL_RESULTS]")  # fmt: skip
GRANITE_TOKENS = ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>")
LAGUNA_TOKENS = ("〈|EOS|〉", "<think>", "</think>", "<assistant>", "</assistant>")
REAL_TEMPLATES = {
    # name: (tokenizer, added special tokens, {bos/eos/kwargs}, outcome per kind, prefix)
    "meta-llama-Llama-3.1-8B-Instruct": ("llama-3.1-instruct", (), {}, OK, ""),
    "meta-llama-Llama-3.2-3B-Instruct": ("llama-3.1-instruct", (), {}, OK, ""),
    "meta-llama-Llama-3.3-70B-Instruct": ("llama-3.1-instruct", (), {}, OK, ""),
    "Qwen-Qwen2.5-7B-Instruct": ("qwen2.5-instruct", (), {}, OK, ""),
    # Qwen3 drops the empty think block of replies before the last user turn: multi-turn is a rewrite.
    "Qwen-Qwen3-0.6B": (
        "qwen2.5-instruct",
        ("<think>", "</think>"),
        {},
        {
            "single": "ok",
            "system_multi": "template_not_prefix_stable",
            "multi": "template_not_prefix_stable",
            "tools": "template_not_prefix_stable",
        },
        "<think>\n\n</think>\n\n",
    ),
    "google-gemma-2-2b-it": (
        "qwen2.5-instruct",
        ("<bos>", "<start_of_turn>", "<end_of_turn>"),
        {"bos": "<bos>"},
        {"single": "ok", "system_multi": "template_error", "multi": "ok", "tools": "ok"},
        "",
    ),
    # Mistral puts the system prompt and the tool list into the last user turn: not prefix-stable.
    "mistralai-Mistral-Nemo-Instruct-2407": (
        "qwen2.5-instruct",
        MISTRAL_TOKENS,
        {"bos": "<s>", "eos": "</s>"},
        {
            "single": "ok",
            "system_multi": "template_not_prefix_stable",
            "multi": "ok",
            "tools": "template_not_prefix_stable",
        },
        "",
    ),
    "deepseek-ai-DeepSeek-V3.1": (
        "qwen2.5-instruct",
        (
            *DEEPSEEK_TOKENS,
            "<｜tool▁calls▁begin｜>",
            "<｜tool▁calls▁end｜>",
            "<｜tool▁call▁begin｜>",
            "<｜tool▁call▁end｜>",
            "<｜tool▁output▁begin｜>",
            "<｜tool▁output▁end｜>",
            "<｜tool▁sep｜>",
        ),
        {"bos": DEEPSEEK_TOKENS[0], "eos": DEEPSEEK_TOKENS[1]},
        OK,
        "",
    ),
    # R1 distills open <think> in the generation prompt; rendered replies lack it.
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": (
        "qwen2.5-instruct",
        DEEPSEEK_TOKENS,
        {"bos": DEEPSEEK_TOKENS[0], "eos": DEEPSEEK_TOKENS[1]},
        dict.fromkeys(KINDS, "template_not_prefix_stable"),
        "",
    ),
    "microsoft-Phi-3.5-mini-instruct": (
        "phi-3-mini-4k-instruct",
        (),
        {},
        OK,  # tool calls written as text (data.tool_fallback)
        "",
    ),
    "ibm-granite-granite-3.3-2B-Instruct": (
        "qwen2.5-instruct",
        GRANITE_TOKENS,
        {"eos": "<|end_of_text|>"},
        OK,  # tool calls written as text (data.tool_fallback)
        "",
    ),
    "ibm-granite-granite-4.0": ("qwen2.5-instruct", GRANITE_TOKENS, {"eos": "<|end_of_text|>"}, OK, ""),
    # The tool_use variant needs tools (fails without); its tool calls and results go through the text fallback.
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": (
        "llama-3.1-instruct",
        ("<|im_start|>", "<|im_end|>"),
        {"eos": "<|im_end|>"},
        {
            "single": "template_error",
            "system_multi": "template_error",
            "multi": "template_error",
            "tools": "ok",  # calls and results as text (data.tool_fallback)
        },
        "",
    ),
    "HuggingFaceTB-SmolLM3-3B": (
        "smollm2-135m-instruct",
        (),
        {},
        OK,  # tool calls written as text (data.tool_fallback)
        "",
    ),
    # GLM ends a reply with no token of its own (the next role tag stops generation): reply only, counted.
    "GLM-4.7-Flash": (
        "qwen2.5-instruct",
        (
            "[gMASK]",
            "<sop>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|observation|>",
            "<think>",
            "</think>",
        ),
        {"kwargs": {"enable_thinking": False}},
        OK,
        "",
    ),
    # Later turns end in <|end|> where the last one ends in <|return|>: a rewrite of the marker.
    "openai-gpt-oss-120b": (
        "qwen2.5-instruct",
        ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>"),
        {"eos": "<|return|>"},
        {
            "single": "ok",
            "system_multi": "template_not_prefix_stable",
            "multi": "template_not_prefix_stable",
            "tools": "ok",
        },
        "<|channel|>final<|message|>",
    ),
    # {% generation %} templates.
    "LFM2.5-8B-A1B": (
        "qwen2.5-instruct",
        ("<|startoftext|>", "<|tool_call_start|>", "<|tool_call_end|>"),
        {"bos": "<|startoftext|>"},
        OK,
        "",
    ),
    "poolside-Laguna-XS.2": ("qwen2.5-instruct", LAGUNA_TOKENS, {}, OK, "\n"),
    "poolside-Laguna-XS-2.1": ("qwen2.5-instruct", LAGUNA_TOKENS, {}, OK, "\n"),
    "poolside-Laguna-S-2.1": ("qwen2.5-instruct", LAGUNA_TOKENS, {}, OK, "</think>"),
}
GENERATION_TAG_TEMPLATES = [
    "LFM2.5-8B-A1B",
    "poolside-Laguna-XS.2",
    "poolside-Laguna-XS-2.1",
    "poolside-Laguna-S-2.1",
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
KIND_CHATS = {
    "single": conversation([Message("user", "Hi there"), Message("assistant", "Hello! How can I help?")], 0),
    "system_multi": conversation(
        [CHAT[0], *CHAT[1:], Message("user", "and 3+3?"), Message("assistant", "6")], 1
    ),
    "multi": conversation(CHAT[1:], 2),
    "tools": conversation(
        [
            Message("user", "Weather in Paris?"),
            Message(
                "assistant",
                "",
                tool_calls=[
                    {
                        "id": "call00001",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    }
                ],
            ),
            Message("tool", '{"temp": 21}', name="get_weather"),
            Message("assistant", "It is 21 degrees."),
        ],
        3,
        tools=[WEATHER_TOOL],
    ),
}


@pytest.fixture(scope="module")
def real_templates(shared_dir):
    return json.loads((shared_dir / "tokenizers" / "chat_templates.json").read_text())["templates"]


def tokenizer_for(tokenizers, name: str):
    tokenizer_name, added, settings, _, _ = REAL_TEMPLATES[name]
    tokenizer = copy.deepcopy(tokenizers(tokenizer_name))
    if added:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": list(added)}, replace_extra_special_tokens=False
        )
    if "bos" in settings:
        tokenizer.bos_token = settings["bos"]
    if "eos" in settings:
        tokenizer.eos_token = settings["eos"]
    return tokenizer


@pytest.mark.parametrize("name", sorted(REAL_TEMPLATES))
def test_real_template_masks_or_reports(tokenizers, real_templates, name):
    _, _, settings, outcomes, prefix = REAL_TEMPLATES[name]
    tokenizer = tokenizer_for(tokenizers, name)
    kwargs = settings.get("kwargs", {})
    template = real_templates[name]["template"]
    # The outcomes of one sample per conversation; per-turn samples: tests/unit/test_per_turn.py.
    config = DataConfig(chat_template=template, chat_template_kwargs=kwargs, multi_turn_mode="whole")
    renderer = Renderer(tokenizer, config)
    for kind, chat in KIND_CHATS.items():
        result = renderer.render(chat)
        if outcomes[kind] != "ok":
            assert isinstance(result, Dropped) and result.reason == outcomes[kind], (kind, result)
            continue
        assert isinstance(result, RenderedSample), (kind, result)
        # What the template cannot render of tools is written as text first (data.tool_fallback: text).
        messages, tools = as_text([m.to_dict() for m in chat.messages], chat.tools, renderer._abilities)
        reference = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, **kwargs)
        assert result.input_ids == reference["input_ids"]
        replies = [message for message in chat.messages if message.role == "assistant"]
        turns = supervised_turns(result, tokenizer)
        assert len(turns) == len(replies)
        for (reply, marker), message in zip(turns, replies, strict=True):
            if message.tool_calls:
                assert "get_weather" in reply and "Paris" in reply, (kind, reply)
                continue
            content = message.content.strip()
            assert reply.rstrip().endswith(content), (kind, reply)
            assert reply.rstrip()[: -len(content)] == prefix, (kind, reply)
            assert bool(marker) == (name != "GLM-4.7-Flash"), (kind, marker)
    if name == "GLM-4.7-Flash":
        assert renderer.stats["turns_without_end_marker"] == 8  # every reply
    else:
        assert renderer.stats["turns_without_end_marker"] == 0


@pytest.mark.parametrize("name", GENERATION_TAG_TEMPLATES)
def test_generation_tag_templates_agree_with_assistant_tokens_mask(tokenizers, real_templates, name):
    """Our labels (found without the tags) against transformers' {% generation %} mask: every token we supervise is
    in it; what it adds is the generation prompt (given at inference, not generated) or whitespace after the
    end-of-turn marker."""
    tokenizer = tokenizer_for(tokenizers, name)
    template = real_templates[name]["template"]
    renderer = Renderer(tokenizer, DataConfig(chat_template=template))
    for chat in KIND_CHATS.values():
        sample = renderer.render(chat)
        messages = [message.to_dict() for message in chat.messages]
        reference = tokenizer.apply_chat_template(
            messages, tools=chat.tools, chat_template=template, return_assistant_tokens_mask=True
        )
        assert reference["input_ids"] == sample.input_ids
        mask = reference["assistant_masks"]
        ours = [label != IGNORE_INDEX for label in sample.labels]
        assert all(mask[index] for index, supervised in enumerate(ours) if supervised)
        prompts = {
            tokenizer.apply_chat_template(
                messages[:turn],
                tools=chat.tools,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=True,
            )[
                len(
                    tokenizer.apply_chat_template(
                        messages[:turn], tools=chat.tools, chat_template=template, tokenize=False
                    )
                ) :
            ]
            for turn, message in enumerate(messages)
            if message["role"] == "assistant"
        }
        extra = [index for index, flag in enumerate(mask) if flag and not ours[index]]
        runs = []
        for index in extra:
            if runs and runs[-1][-1] == index - 1:
                runs[-1].append(index)
            else:
                runs.append([index])
        for run in runs:
            text = tokenizer.decode([sample.input_ids[index] for index in run])
            assert not text.strip() or text in prompts, (name, text, prompts)


def test_chat_template_kwargs_reach_the_template(tokenizers):
    cfg = load_config(None, ["data.chat_template_kwargs={enable_thinking: false}"]).data
    assert cfg.chat_template_kwargs == {"enable_thinking": False}
    qwen = tokenizers("qwen2.5-instruct")
    cfg.chat_template = "{% for m in messages %}{{ m.role + ('!' if enable_thinking else ':') + m.content + '\\n' }}{% endfor %}"
    sample = Renderer(qwen, cfg).render(conversation([Message("user", "hi"), Message("assistant", "yo")]))
    assert qwen.decode(sample.input_ids) == "user:hi\nassistant:yo\n"


@pytest.mark.parametrize(
    "name",
    ["microsoft-Phi-3.5-mini-instruct", "ibm-granite-granite-3.3-2B-Instruct", "HuggingFaceTB-SmolLM3-3B"],
)
def test_tool_fallback_drop_reports_templates_that_cannot_render_tool_calls(tokenizers, real_templates, name):
    tokenizer = tokenizer_for(tokenizers, name)
    config = DataConfig(chat_template=real_templates[name]["template"], tool_fallback="drop")
    result = Renderer(tokenizer, config).render(KIND_CHATS["tools"])
    assert isinstance(result, Dropped) and result.reason == "template_drops_tool_calls"


def test_every_builtin_template_name_has_a_spec():
    assert set(BUILTIN_TEMPLATES) == set(Template.values()) - {Template.tokenizer, Template.custom}
