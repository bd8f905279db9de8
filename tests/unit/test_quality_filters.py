"""The rule-based quality filters: one golden case per rule (kept and dropped, English and Chinese, real records of
the shared sets where one shows the rule), the fixed rule order, the no-rule fast path, config errors, and
language detection that gives the same verdict in every process."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys

import pytest
from shared_paths import DATA, REPO, TOKENIZERS

from ift_dist.config.checks import ConfigError
from ift_dist.config.data_schema import SourceConfig
from ift_dist.config.quality_schema import FilterConfig
from ift_dist.data.contracts import SampleRef
from ift_dist.data.quality.filters import RULES, Filters, active_rules, instruction_words, language_of
from ift_dist.data.quality.texts import QualityText
from ift_dist.data.records import detect_format, to_conversation

EN = DATA / "llamafactory" / "alpaca_en_demo.json"
ZH = DATA / "llamafactory" / "alpaca_zh_demo.json"
HEALTH_EN = "Eating a balanced diet with plenty of fruit and vegetables keeps the body healthy and strong."
HEALTH_ZH = "保持健康的饮食，多吃水果和蔬菜，每天锻炼身体，保证充足的睡眠，这样身体才会健康强壮。"


def text(prompt: str, answer: str, instruction: str | None = None, index: int = 0) -> QualityText:
    return QualityText(
        ref=SampleRef("t", index),
        prompt=prompt,
        answer=answer,
        conversation=f"user: {prompt}\n\nassistant: {answer}",
        instruction=prompt if instruction is None else instruction,
    )


@functools.cache
def _records(path) -> list:
    return json.loads(path.read_text(encoding="utf-8"))


def real(path, index: int) -> QualityText:
    record = _records(path)[index]
    conversation = to_conversation(
        record,
        fmt=detect_format(record),
        source=SourceConfig(path=str(path), name=path.stem),
        ref=SampleRef(path.stem, index),
        file=str(path),
        location=f"record {index}",
    )
    return QualityText.of(conversation)


def verdict(cfg: FilterConfig, item: QualityText, tokenizer=None) -> tuple[str, str] | None:
    removal = Filters(cfg, tokenizer).check(item)
    return None if removal is None else (removal.reason, removal.detail)


# --- lengths ---------------------------------------------------------------------------------------------------
def test_character_bounds_and_ratio():
    cfg = FilterConfig(min_prompt_chars=10, max_prompt_chars=40, min_answer_chars=3, max_answer_chars=30)
    assert verdict(cfg, text("Hi there", "Hello!")) == ("filter:prompt_chars", "8 chars < min 10")
    assert verdict(cfg, text("x" * 41, "Hello!")) == ("filter:prompt_chars", "41 chars > max 40")
    assert verdict(cfg, text("Say hello, please", "Hi")) == ("filter:answer_chars", "2 chars < min 3")
    assert verdict(cfg, text("Say hello, please", "y" * 31)) == ("filter:answer_chars", "31 chars > max 30")
    assert verdict(cfg, text("Say hello, please", "Hello!")) is None
    assert verdict(cfg, text("说你好，谢谢你们大家好", "你好！")) is None  # 11 and 3 characters, not bytes
    ratio = FilterConfig(min_answer_prompt_ratio=0.5, max_answer_prompt_ratio=4)
    assert verdict(ratio, text("a" * 100, "b" * 10)) == ("filter:answer_prompt_ratio", "ratio 0.1 < min 0.5")
    assert verdict(ratio, text("a" * 10, "b" * 41)) == ("filter:answer_prompt_ratio", "ratio 4.1 > max 4")
    assert verdict(ratio, text("a" * 10, "b" * 40)) is None


def test_token_bounds_count_without_special_tokens():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "smollm2-135m-instruct")
    cfg = FilterConfig(min_prompt_tokens=3, max_answer_tokens=8)
    # SmolLM2's BPE: "Hello world" is ["Hello", " world"]; its chat template's <|im_start|> is not counted.
    assert verdict(cfg, text("Hello world", "Hi"), tokenizer) == ("filter:prompt_tokens", "2 tokens < min 3")
    # Byte-level BPE spends 17 tokens on these 10 Chinese characters.
    assert verdict(cfg, text("Give three tips for staying healthy.", "保持健康的三个提示。"), tokenizer) == (
        "filter:answer_tokens",
        "17 tokens > max 8",
    )
    assert verdict(cfg, text("Give three tips for staying healthy.", "Eat well."), tokenizer) is None
    with pytest.raises(ConfigError, match=r"data\.quality\.filters: token bounds need a tokenizer"):
        Filters(cfg)


# --- refusals --------------------------------------------------------------------------------------------------
def test_refusals_in_real_records_english_and_chinese():
    cfg = FilterConfig(refusal=True)
    assert verdict(cfg, real(EN, 80)) == (
        "filter:refusal",
        "'as an ai language model' matches /\\bas an ai (language )?model\\b/",
    )
    assert verdict(cfg, real(EN, 930)) == (
        "filter:refusal",
        "\"i'm sorry, but i cannot\" matches /\\bi['’]?m sorry,? but i (cannot|can['’]?t)\\b/",
    )
    assert verdict(cfg, real(ZH, 142)) == (
        "filter:refusal",
        "'作为一个语言模型' matches /作为一?个?(大型)?语言模型/",
    )
    # A full-width comma (NFKC-folded) and curly apostrophes are refusals too; a helpful "I can help" is not.
    assert verdict(cfg, text("帮我写", "对不起，我不能写这个。"))[0] == "filter:refusal"
    assert verdict(cfg, text("Help", "I can’t assist with that."))[0] == "filter:refusal"
    assert verdict(cfg, text("Help", "Sure, I can help you plan the trip.")) is None
    for index in (0, 1, 2):
        assert verdict(cfg, real(EN, index)) is None and verdict(cfg, real(ZH, index)) is None


def test_custom_refusal_patterns_and_a_bad_one():
    custom = FilterConfig(refusal_patterns=[r"\bopenai\b"])  # the built-in list is off without `refusal`
    assert verdict(custom, text("Who made you?", "I was trained by OpenAI.")) == (
        "filter:refusal",
        "'openai' matches /\\bopenai\\b/",
    )
    assert verdict(custom, real(EN, 80)) is None
    with pytest.raises(
        ConfigError, match=r"data\.quality\.filters\.refusal_patterns\[1\]: not a regular expr"
    ):
        Filters(FilterConfig(refusal_patterns=["fine", "(unclosed"]))
    with pytest.raises(ValueError, match=r"q\.filters\.refusal_patterns\[0\]"):
        Filters(FilterConfig(refusal_patterns=["*"]), key="q.filters")


# --- Stanford Alpaca's heuristics ------------------------------------------------------------------------------
ALPACA = FilterConfig(alpaca_heuristics=True)


@pytest.mark.parametrize(
    ("instruction", "expected"),
    [
        (
            "Draw a picture of a cat sitting on a mat.",
            ("filter:alpaca_blacklist", "blacklisted word 'picture'"),
        ),
        (
            "Please GO  TO the website and summarise it.",
            ("filter:alpaca_blacklist", "blacklisted word 'go to'"),
        ),
        (
            "Write a program that sorts a list of numbers.",
            ("filter:alpaca_blacklist", "starts with 'Write a program'"),
        ),
        ("Explain the mapping between keys and values.", None),  # "map" only as a whole word
        (
            '"Hamlet" is a play; summarise its story briefly.',
            ("filter:alpaca_punctuation", "starts with '\"'"),
        ),
        ("¿Cuál es la capital de Francia?", ("filter:alpaca_non_ascii", "starts with '¿' (U+00BF)")),
        ("Write a short poem", None),  # 4 words: kept
        ("Write a poem", ("filter:alpaca_length", "3 words <= min 3")),  # Alpaca: len(split()) <= 3 drops
        (" ".join(["word"] * 150), None),
        (" ".join(["word"] * 151), ("filter:alpaca_length", "151 words > max 150")),  # Alpaca: > 150 drops
        ("保持健康的三个提示。", None),  # CJK: a non-ASCII start is expected; 9 words (characters)
        ("使用Adobe Illustrator创建一个Ocean Blue的标志。", None),  # starts CJK though mostly Latin letters
    ],
)
def test_alpaca_heuristics(instruction, expected):
    assert verdict(ALPACA, text(instruction, "An answer.")) == expected


def test_alpaca_heuristics_on_real_chinese_records_and_settings():
    assert verdict(ALPACA, real(ZH, 85)) == ("filter:alpaca_length", "2 words <= min 3")  # "友谊"
    assert verdict(ALPACA, real(ZH, 330)) == ("filter:alpaca_punctuation", "starts with '\"'")
    assert instruction_words("道歉。") == 2 and instruction_words("Give three tips - now") == 5
    wider = dataclasses.replace(ALPACA, alpaca_min_words=1, alpaca_max_words=0, alpaca_blacklist=["poem"])
    assert verdict(wider, real(ZH, 85)) is None  # 2 > 1, and no upper bound
    assert verdict(wider, text("Write a poem", "A poem.")) == (
        "filter:alpaca_blacklist",
        "blacklisted word 'poem'",
    )
    # The instruction is judged, not the Alpaca input that follows it in the prompt.
    assert verdict(
        ALPACA, text("Describe this scene.\n\nAn image of a beach.", "A beach.", "Describe this scene.")
    ) == (
        "filter:alpaca_length",
        "3 words <= min 3",
    )


# --- language, repetition, code fences, empty answers ----------------------------------------------------------
def test_language_mismatch():
    cfg = FilterConfig(language_mismatch=True)
    assert verdict(cfg, text(HEALTH_EN, HEALTH_ZH)) == ("filter:language_mismatch", "prompt en != answer zh")
    assert verdict(cfg, real(ZH, 56)) == ("filter:language_mismatch", "prompt zh != answer en")
    assert verdict(cfg, text(HEALTH_EN, HEALTH_EN)) is None
    assert verdict(cfg, real(ZH, 0)) is None and verdict(cfg, real(EN, 0)) is None
    traditional = "保持健康的飲食，多吃水果和蔬菜，每天鍛煉身體，保證充足的睡眠，這樣身體才會健康強壯。"
    assert language_of(HEALTH_ZH) == language_of(traditional) == "zh"  # zh-cn and zh-tw are one language
    assert verdict(cfg, text(HEALTH_ZH, traditional)) is None
    assert verdict(cfg, text(HEALTH_EN, "好的，谢谢。")) is None  # 5 letters: too short to judge
    code = "```python\nwhile True:\n    print('hello world, again and again')\n```"
    assert verdict(cfg, text(HEALTH_ZH, code)) is None  # a code block is not a language


def test_language_detection_is_the_same_in_every_process():
    # Short and ambiguous: unseeded, langdetect's random n-gram sampling can change this verdict between runs.
    samples = ["Amanda, James, John, Maria, Robert", "Grinding, hustling, or grinding gears.", HEALTH_EN]
    here = [language_of(sample) for sample in samples]
    assert [language_of(sample) for sample in samples] == here
    script = (
        "import json, sys; from ift_dist.data.quality.filters import language_of\n"
        "print(json.dumps([language_of(s) for s in json.loads(sys.argv[1])]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(samples)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == here
    # Seeded, the guesses are pinned (and wrong for the names and the slang: short texts are where it errs).
    assert here == ["id", "af", "en"]


def test_repetition():
    cfg = FilterConfig(repetition_ngram=2, max_repeats=5)
    loop = "Buy now! " * 6 + "Thanks."
    assert verdict(cfg, text("Advertise", loop)) == ("filter:repetition", "'buy now' x6 > max 5")
    assert verdict(cfg, text("Advertise", "Buy now! " * 5 + "Thanks.")) is None  # 5 is not more than 5
    assert verdict(cfg, text("广告", "快买快买快买快买快买快买")) == (
        "filter:repetition",
        "'快买' x6 > max 5",
    )
    # Markdown between Chinese characters does not make a repeat.
    assert verdict(cfg, text("列表", "**一**、**二**、**三**、**四**、**五**、**六**")) is None
    assert verdict(FilterConfig(repetition_ngram=4, max_repeats=5), real(EN, 0)) is None


def test_unbalanced_code_fences():
    cfg = FilterConfig(unbalanced_code=True)
    assert verdict(cfg, text("Code", "Here:\n```python\nprint(1)\n```\nDone.")) is None
    assert verdict(cfg, text("Code", "Here:\n```python\nprint(1)\n")) == (
        "filter:unbalanced_code",
        "1 ``` fences (odd)",
    )
    assert verdict(cfg, real(EN, 179)) == ("filter:unbalanced_code", "1 ``` fences (odd)")
    assert verdict(cfg, text("代码", "```\na\n```\n````\nb\n````\n```")) == (
        "filter:unbalanced_code",
        "5 ``` fences (odd)",
    )


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        ("   \n ", "empty"),
        ("N/A", "placeholder 'n/a'"),
        ("<noinput>", "placeholder '<noinput>'"),
        ("  TODO ", "placeholder 'todo'"),
        ("…", "placeholder '...'"),  # NFKC folds the ellipsis character
        ("暂无", "placeholder '暂无'"),
        ("无", "placeholder '无'"),
        ("None of the above.", None),
        ("无可奉告。", None),
    ],
)
def test_empty_and_placeholder_answers(answer, detail):
    removal = Filters(FilterConfig(empty_answer=True)).check(text("Question?", answer))
    assert (removal and removal.detail) == detail
    assert removal is None or (removal.reason == "filter:empty_answer" and removal.ref == SampleRef("t", 0))


# --- order and the fast path -----------------------------------------------------------------------------------
def test_rules_run_in_their_fixed_order():
    assert RULES == (
        "prompt_chars", "answer_chars", "prompt_tokens", "answer_tokens", "answer_prompt_ratio", "refusal",
        "alpaca_blacklist", "alpaca_punctuation", "alpaca_non_ascii", "alpaca_length", "language_mismatch",
        "repetition", "unbalanced_code", "empty_answer",
    )  # fmt: skip
    cfg = FilterConfig(
        min_prompt_chars=10, refusal=True, alpaca_heuristics=True, unbalanced_code=True, empty_answer=True
    )
    assert active_rules(cfg) == [
        "prompt_chars", "refusal", "alpaca_blacklist", "alpaca_punctuation", "alpaca_non_ascii", "alpaca_length",
        "unbalanced_code", "empty_answer",
    ]  # fmt: skip
    bad = text("Draw it", "As an AI language model I cannot draw. ```")  # fails four rules
    reasons = []
    for switch_off in ({}, {"min_prompt_chars": 0}, {"refusal": False}, {"alpaca_heuristics": False}):
        cfg = dataclasses.replace(cfg, **switch_off)
        reasons.append(verdict(cfg, bad)[0])
    assert reasons == [
        "filter:prompt_chars",
        "filter:refusal",
        "filter:alpaca_blacklist",
        "filter:unbalanced_code",
    ]


def test_no_rule_is_a_fast_path():
    def no_tokenizer(*args, **kwargs):
        raise AssertionError("no rule should count tokens")

    filters = Filters(FilterConfig(), no_tokenizer)
    assert filters.rules == [] and active_rules(FilterConfig()) == []
    assert filters.check(text("", "   ")) is None  # would fail empty_answer, which is off
    assert Filters(FilterConfig(min_prompt_chars=1), no_tokenizer).check(text("Hi", "Hello")) is None
