"""scoring.py: lm-eval's tokenisation of (context, continuation) pairs, and batched continuation log-likelihoods equal
to a plain one-sequence-at-a-time forward with the full logits."""

from __future__ import annotations

import logging

import pytest
import torch
from shared_paths import TOKENIZERS
from tiny_model import tiny_llama
from transformers import AutoTokenizer

from ift_dist.eval.records import McPrompt
from ift_dist.eval.scoring import encode_pair, max_length, score_prompts

PAIRS = [
    ("Question: What is 1 + 1?\nA. 1\nB. 2\nAnswer:", " B"),
    ("Question: What is 1 + 1?\nAnswer: ", "B"),  # the trailing space moves to the continuation
    ("x  \n", "yes it is"),
    ("问题：中国的首都是哪里？\nA. 北京\nB. 上海\n答案：", "A"),
    ("以下是中国关于地理考试的单项选择题。\n\n", "北京是首都"),
    ("<|begin_of_text|>Hello there", " friend"),  # already starts with Llama-3's BOS: no second one
]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(max_position_embeddings=64).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZERS / "smollm2-135m-instruct")


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-instruct", "llama-3.1-instruct"])
def test_encode_pair_equals_lm_eval(name, model):
    from lm_eval.models.huggingface import HFLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    for context, continuation in PAIRS:
        expected = reference._encode_pair(context, continuation)
        assert encode_pair(tokenizer, context, continuation) == (list(expected[0]), list(expected[1]))
    # Llama-3 prepends its BOS, once.
    if name == "llama-3.1-instruct":
        assert encode_pair(tokenizer, *PAIRS[0])[0][:2].count(tokenizer.bos_token_id) == 1
        assert encode_pair(tokenizer, *PAIRS[-1])[0].count(tokenizer.bos_token_id) == 1


def naive_scores(model, tokenizer, prompts, limit):
    """One unpadded sequence per (context, continuation) through the whole model, as lm-eval's loop does."""
    scores = []
    for prompt in prompts:
        row = []
        for continuation in prompt.continuations:
            context_ids, continuation_ids = encode_pair(tokenizer, prompt.context, continuation)
            input_ids = (context_ids + continuation_ids)[-(limit + 1) :][:-1]
            with torch.no_grad():
                logits_TV = model(torch.tensor([input_ids])).logits[0].float()
            log_probs_TV = torch.log_softmax(logits_TV, dim=-1)[-len(continuation_ids) :]
            row.append(float(log_probs_TV[torch.arange(len(continuation_ids)), continuation_ids].sum()))
        scores.append(row)
    return scores


def flat(scores: list[list[float]]) -> torch.Tensor:
    return torch.tensor([value for row in scores for value in row])


LETTER_PROMPTS = [
    McPrompt(
        "The capital of France?\nA. Paris\nB. Rome\nC. Oslo\nD. Bern\nAnswer:", (" A", " B", " C", " D")
    ),
    McPrompt("Answer:", (" A", " B", " C", " D")),
    McPrompt("2 + 2 =\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer: ", ("A", "B", "C", "D")),
    # A chat template's trailing newline moves to the continuations: "\nA".."\nD", two tokens sharing the first.
    McPrompt("<|im_start|>user\n2 + 2 =\nA. 3\nB. 4<|im_end|>\n<|im_start|>assistant\n", ("A", "B")),
]
TEXT_PROMPTS = [
    McPrompt("The capital of France is", (" Paris", " the city of Rome", " Oslo, Norway", " Bern")),
    McPrompt("Two plus two equals", (" four", " twenty-two, written as digits")),
    McPrompt("中国的首都是", ("北京", "上海市", "广州")),
]


def test_letter_continuations_take_one_row_per_prompt(model, tokenizer):
    batches = []

    def counting_forward(module, args, kwargs):
        batches.append(kwargs["input_ids"].shape[0])

    handle = model.model.register_forward_pre_hook(counting_forward, with_kwargs=True)
    try:
        scores = score_prompts(model, tokenizer, LETTER_PROMPTS, batch_size=8)
    finally:
        handle.remove()
    assert batches == [len(LETTER_PROMPTS)]  # one row per prompt, not one per choice
    torch.testing.assert_close(
        flat(scores), flat(naive_scores(model, tokenizer, LETTER_PROMPTS, 64)), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_batched_scores_equal_the_unbatched_loop(model, tokenizer, batch_size):
    prompts = (
        LETTER_PROMPTS + TEXT_PROMPTS
    )  # single- and multi-token continuations, mixed lengths in one batch
    finished = []
    scores = score_prompts(model, tokenizer, prompts, batch_size=batch_size, progress=finished.append)
    expected = naive_scores(model, tokenizer, prompts, 64)
    assert [len(row) for row in scores] == [len(prompt.continuations) for prompt in prompts]
    for row, expected_row in zip(scores, expected, strict=True):
        torch.testing.assert_close(torch.tensor(row), torch.tensor(expected_row), rtol=0, atol=1e-5)
    assert sum(finished) == len(prompts)
    assert model.training is False


def test_lm_eval_loglikelihood_agrees(model, tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, softmax_dtype="float32")
    requests = [
        Instance("loglikelihood", {}, (prompt.context, continuation), index)
        for prompt in LETTER_PROMPTS + TEXT_PROMPTS
        for index, continuation in enumerate(prompt.continuations)
    ]
    expected = [value for value, _ in reference.loglikelihood(requests, disable_tqdm=True)]
    scores = score_prompts(model, tokenizer, LETTER_PROMPTS + TEXT_PROMPTS, batch_size=5)
    torch.testing.assert_close(flat(scores), torch.tensor(expected), rtol=0, atol=1e-4)


def test_over_long_context_keeps_its_end(model, tokenizer, caplog):
    limit = max_length(model, tokenizer)
    assert limit == 64  # the config's max_position_embeddings
    long_context = " ".join(f"word{index}" for index in range(200)) + "\nAnswer:"
    assert len(encode_pair(tokenizer, long_context, " A")[0]) > limit
    prompts = [
        McPrompt(long_context, (" A", " B")),
        McPrompt(long_context + "\n", ("A", "B")),
        McPrompt(long_context, (" yes indeed", " no")),
    ]
    with caplog.at_level(logging.WARNING, logger="ift_dist.eval.scoring"):
        scores = score_prompts(model, tokenizer, prompts + LETTER_PROMPTS[:1], batch_size=4)
    assert "3 of 4 prompts are longer than the model's 64 tokens" in caplog.text
    torch.testing.assert_close(
        torch.tensor(scores[:3]),
        torch.tensor(naive_scores(model, tokenizer, prompts, limit)),
        rtol=0,
        atol=1e-5,
    )


def test_training_mode_is_restored(model, tokenizer):
    model.train()
    try:
        score_prompts(model, tokenizer, LETTER_PROMPTS[:1])
        assert model.training is True
    finally:
        model.eval()


def test_soft_capped_model_takes_the_full_forward(tokenizer):
    """Gemma-2 soft-caps its logits after the output embedding: scoring the projection alone would be wrong."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        final_logit_softcapping=0.5,  # small enough that capped and uncapped scores differ clearly
        attn_implementation="eager",
    )
    gemma = Gemma2ForCausalLM(config).eval()
    prompts = TEXT_PROMPTS[:2]
    torch.testing.assert_close(
        flat(score_prompts(gemma, tokenizer, prompts)),
        flat(naive_scores(gemma, tokenizer, prompts, 128)),
        rtol=0,
        atol=1e-5,
    )


def test_a_prompt_without_a_scorable_continuation_is_named(model, tokenizer):
    with pytest.raises(ValueError, match="prompt 0"):
        score_prompts(model, tokenizer, [McPrompt("Answer:", ())])
