"""Answer generation on the real SmolLM2-135M-Instruct (fp32, CPU): batched == one by one, MT-bench's second turn
after the model's own first answer, finish reasons and token counts, resuming, seeded sampling independent of the
batch, 2 ranks == 1 rank; the answers page."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as multiprocessing
from shared_paths import DATA

from ift_dist.eval.answers_file import answered_ids, append_answers, read_answers
from ift_dist.eval.answers_html import write_answers_html
from ift_dist.eval.generate import (
    SamplingConfig,
    chat_template,
    generate_answers,
    render_prompt,
    write_generation_meta,
)
from ift_dist.eval.prompt_sets import EvalPrompt, load_prompt_set

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=10)
# SmolLM2 ends this one after a few tokens (finish "stop"); the others run into max_new_tokens.
SHORT = EvalPrompt("short", "mine", None, ["What is 2+2? Answer with only the number."])


def eval_prompts() -> list[EvalPrompt]:
    vicuna = load_prompt_set("vicuna_bench", data_dir=str(DATA / "eval"), limit=2)
    mt_bench = load_prompt_set("mt_bench", data_dir=str(DATA / "eval"), limit=2)
    return [vicuna[0], vicuna[1], mt_bench[0], SHORT, mt_bench[1]]


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load(smollm2_dir)


@pytest.fixture(scope="module")
def one_by_one(smollm2):
    """The greedy answers generated one prompt per batch: the reference every other run is compared with."""
    model, tokenizer = smollm2
    return [a.to_json() for a in generate_answers(model, tokenizer, eval_prompts(), GREEDY, batch_size=1)]


def test_batched_equals_one_by_one(smollm2, one_by_one):
    model, tokenizer = smollm2
    prompts = eval_prompts()
    assert len({len(render_prompt(tokenizer, p, [], 0)) for p in prompts}) == len(prompts)  # mixed lengths
    batched = generate_answers(model, tokenizer, prompts, GREEDY, batch_size=4, show_progress=False)
    assert [a.to_json() for a in batched] == one_by_one
    assert [r["id"] for r in one_by_one] == [p.id for p in prompts]


def test_second_turn_follows_own_first_answer(smollm2, one_by_one):
    _, tokenizer = smollm2
    record = next(r for r in one_by_one if r["set"] == "mt_bench")
    prompt = eval_prompts()[2]
    assert record["turns"] == prompt.turns and len(record["answers"]) == 2 and all(record["answers"])
    second = render_prompt(tokenizer, prompt, record["answers"][:1], 1)
    assert record["answers"][0] in second and prompt.turns[0] in second and second.endswith("assistant\n")
    for turn, text in enumerate([render_prompt(tokenizer, prompt, [], 0), second]):
        assert record["prompt_tokens"][turn] == len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_finish_reasons_and_token_counts(smollm2, one_by_one):
    _, tokenizer = smollm2
    for record in one_by_one:
        for answer, reason, count in zip(
            record["answers"], record["finish_reasons"], record["completion_tokens"], strict=True
        ):
            answer_tokens = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
            if reason == "stop":  # the answer's tokens and the stop token <|im_end|>
                assert count == answer_tokens + 1 < GREEDY.max_new_tokens
            else:
                assert reason == "length" and count == GREEDY.max_new_tokens
    short = next(r for r in one_by_one if r["id"] == "short")
    assert short["finish_reasons"] == ["stop"] and "4" in short["answers"][0]
    assert one_by_one[0]["finish_reasons"] == ["length"]
    assert one_by_one[0]["sampling"] == {
        "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "max_new_tokens": 10,
        "seed": 1234, "do_sample": False,
    }  # fmt: skip


def test_resume_skips_done_and_appends(smollm2, one_by_one, tmp_path):
    """A run that stopped after two prompts, then a resumed one: the file holds every answer once, in order."""
    model, tokenizer = smollm2
    path = tmp_path / "answers.jsonl"
    append_answers(path, one_by_one[:2])
    with path.open("a") as handle:  # a crash in the middle of the next write
        handle.write('{"id": "cut sh')
    done = answered_ids(read_answers(path))
    assert done == {(one_by_one[0]["id"], 0), (one_by_one[1]["id"], 0)}
    steps = []
    resumed = generate_answers(
        model, tokenizer, eval_prompts(), GREEDY, batch_size=2, done_ids=done, show_progress=False,
        on_batch=lambda answers: (steps.append(len(answers)), append_answers(path, answers)),
    )  # fmt: skip
    assert [a.to_json() for a in resumed] == one_by_one[2:] and steps == [2, 1]
    assert read_answers(path) == one_by_one


def test_seeded_sampling_does_not_depend_on_the_batch(smollm2):
    model, tokenizer = smollm2
    prompts = eval_prompts()[:2]
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=8, seed=7)

    def run(batch_size: int, config: SamplingConfig = sampling) -> list[list[str]]:
        answers = generate_answers(
            model, tokenizer, prompts, config, batch_size=batch_size, num_samples=2, show_progress=False
        )
        assert all(a.sampling["do_sample"] for a in answers)
        return [a.answers for a in answers]

    batched = run(4)
    assert batched == run(1)
    assert batched[0] != batched[1] or batched[2] != batched[3]  # the samples of a prompt differ
    reseeded = run(4, SamplingConfig(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=8, seed=8))
    assert reseeded != batched


def test_mt_bench_temperatures_when_none_given():
    mt_bench = load_prompt_set("mt_bench", data_dir=str(DATA / "eval"))
    by_category = {p.category: SamplingConfig().temperature_for(p) for p in mt_bench}
    assert by_category == {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                           "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}  # fmt: skip
    assert SamplingConfig(temperature=0.3).temperature_for(mt_bench[0]) == 0.3
    assert SamplingConfig().temperature_for(SHORT) == 0.0  # other sets: greedy
    assert SamplingConfig().record(0.1)["do_sample"] and not SamplingConfig().record(0.0)["do_sample"]
    with pytest.raises(ValueError, match=r"sampling\.top_p"):
        SamplingConfig(top_p=0.0)


def test_answers_page_and_generation_meta(smollm2, one_by_one, tmp_path):
    _, tokenizer = smollm2
    records = [dict(one_by_one[0], turns=["<b>bold & raw</b>"], answers=["a < b"], reference=["ref</pre>"])]
    meta_path = write_generation_meta(
        tmp_path, model_name="smollm2", set_name="mine", prompts_file="x.jsonl",
        chat_template=chat_template(tokenizer), sampling=GREEDY, num_samples=1,
    )  # fmt: skip
    meta = json.loads(meta_path.read_text())
    assert meta["chat_template"] == tokenizer.chat_template and meta["sampling"]["max_new_tokens"] == 10
    page = write_answers_html(tmp_path / "answers.html", records, meta).read_text()
    assert "&lt;b&gt;bold &amp; raw&lt;/b&gt;" in page and "a &lt; b" in page and "ref&lt;/pre&gt;" in page
    assert "<b>bold" not in page and "<script" not in page and "length" in page


def _rank_main(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    """One of two ranks: its share of the prompts, gathered; rank 0 appends each step to answers.jsonl."""
    import torch.distributed as torch_dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, tokenizer = load(model_dir)
        forwards = []
        model.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
        path = os.path.join(out_dir, "answers.jsonl")
        answers = generate_answers(
            model, tokenizer, eval_prompts()[2:], GREEDY, batch_size=1, synced=True, show_progress=False,
            on_batch=lambda step: append_answers(path, step),
        )  # fmt: skip
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump({"answers": [a.to_json() for a in answers], "forwards": len(forwards)}, handle)
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_equal_one(smollm2_dir, one_by_one, tmp_path):
    """3 prompts over 2 ranks (rank 0: both MT-bench pairs, 4 generate calls; rank 1: the short one): synced mode runs
    idle generates on rank 1, so both run the same forwards; the gathered answers are one process's, in order."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    multiprocessing.spawn(_rank_main, args=(port, str(smollm2_dir), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for record in ranks:
        assert record["answers"] == one_by_one[2:]
    assert ranks[0]["forwards"] == ranks[1]["forwards"] > 0
    assert read_answers(tmp_path / "answers.jsonl") == one_by_one[2:]
