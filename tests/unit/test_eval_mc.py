"""mc.py: the accuracies summarize computes, the files write_results writes, and evaluate_benchmark on a tiny model
over real MMLU questions, whose predictions must be the argmax of independently computed scores."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as multiprocessing
from shared_paths import DATA, TOKENIZERS
from tiny_model import tiny_llama
from transformers import AutoTokenizer

from ift_dist.config.choices import McScoring, PromptFormat
from ift_dist.config.eval_schema import BenchmarkConfig
from ift_dist.eval.benchmarks import load_questions, load_shots, open_benchmark
from ift_dist.eval.mc import McResult, evaluate_benchmark, markdown_table, summarize, write_results
from ift_dist.eval.prompts import build_prompt
from ift_dist.eval.records import Prediction, Subject
from ift_dist.eval.scoring import encode_pair

EVAL_DATA = DATA / "eval"
SUBJECTS = {
    "algebra": Subject("algebra", "algebra", "STEM"),
    "physics": Subject("physics", "physics", "STEM"),
    "law": Subject("law", "law", "Humanities"),
}


def prediction(subject: str, number: int, gold: str, predicted: str, predicted_norm: str | None = None):
    return Prediction("toy", subject, f"{subject}/{number}", gold, predicted, [0.0] * 4, predicted_norm)


def test_summarize_micro_and_macro():
    predictions = [
        prediction("algebra", 0, "A", "A"),  # algebra 1/1
        *(prediction("physics", n, "B", "C") for n in range(3)),  # physics 0/3
        prediction("law", 0, "D", "D"),  # law 1/2
        prediction("law", 1, "D", "A"),
    ]
    summary = summarize(predictions, SUBJECTS, McScoring.letter)
    assert summary["questions"] == 6
    assert summary["acc"] == pytest.approx(2 / 6)  # micro: every question counts once
    assert summary["acc_macro"] == pytest.approx((1 + 0 + 0.5) / 3)  # macro: every subject counts once
    assert summary["subjects"]["physics"] == {
        "acc": 0.0,
        "questions": 3,
        "category": "STEM",
        "name": "physics",
    }
    assert summary["categories"]["STEM"] == {"acc": pytest.approx(0.25), "acc_macro": 0.5, "questions": 4}
    assert summary["categories"]["Humanities"] == {"acc": 0.5, "acc_macro": 0.5, "questions": 2}
    assert "acc_norm" not in summary


def test_summarize_option_text_adds_acc_norm():
    predictions = [
        prediction("algebra", 0, "A", "B", predicted_norm="A"),
        prediction("law", 0, "C", "C", predicted_norm="A"),
        prediction("law", 1, "C", "D", predicted_norm="C"),
    ]
    summary = summarize(predictions, SUBJECTS, McScoring.option_text)
    assert summary["acc"] == pytest.approx(1 / 3)
    assert summary["acc_norm"] == pytest.approx(2 / 3)
    assert summary["subjects"]["algebra"]["acc_norm"] == 1.0
    assert summary["categories"]["Humanities"]["acc_norm"] == 0.5


def test_summarize_refuses_an_unknown_subject():
    with pytest.raises(ValueError, match="geology"):
        summarize([prediction("geology", 0, "A", "A")], SUBJECTS, McScoring.letter)


def test_write_results(tmp_path):
    predictions = [prediction("algebra", 0, "A", "A"), prediction("law", 0, "B", "C")]
    summary = summarize(predictions, SUBJECTS, McScoring.letter)
    result = McResult("toy", {"split": "test", "subjects": ["法律"]}, predictions, summary, seconds=4.0)
    write_results(tmp_path / "out", result)
    lines = (tmp_path / "out" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [p.to_json() for p in predictions]
    assert json.loads(lines[1])["correct"] is False
    text = (tmp_path / "out" / "results.json").read_text(encoding="utf-8")
    assert "法律" in text  # written as text, not \\u escapes
    record = json.loads(text)
    assert record["label"] == "toy"
    assert record["summary"]["acc"] == 0.5
    assert record["seconds"] == 4.0
    assert record["questions_per_second"] == 0.5


@pytest.fixture(scope="module")
def model():
    return tiny_llama().eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZERS / "smollm2-135m-instruct")


def independent_scores(model, tokenizer, cfg: BenchmarkConfig):
    """The questions and their scores, one unpadded forward of the whole model per option."""
    benchmark = open_benchmark(cfg.name, str(EVAL_DATA))
    questions = load_questions(benchmark, cfg.split, cfg.subjects, cfg.limit)
    scores = []
    for question in questions:
        shots = load_shots(benchmark, question.subject, cfg.shots)
        prompt = build_prompt(question, shots, benchmark, cfg.scoring, cfg.format, tokenizer)
        row = []
        for continuation in prompt.continuations:
            context_ids, continuation_ids = encode_pair(tokenizer, prompt.context, continuation)
            with torch.no_grad():
                logits_TV = model(torch.tensor([context_ids + continuation_ids[:-1]])).logits[0].float()
            log_probs_TV = torch.log_softmax(logits_TV[-len(continuation_ids) :], dim=-1)
            row.append(float(log_probs_TV[torch.arange(len(continuation_ids)), continuation_ids].sum()))
        scores.append(row)
    return questions, scores


def mmlu_config(**overrides) -> BenchmarkConfig:
    fields = {
        "name": "mmlu",
        "data_dir": str(EVAL_DATA),
        "subjects": ["high_school_geography", "abstract_algebra"],
        "limit": 3,
        "shots": 1,
        "batch_size": 4,
    }
    return BenchmarkConfig(**{**fields, **overrides})


@pytest.mark.parametrize("prompt_format", [PromptFormat.plain, PromptFormat.chat])
def test_evaluate_benchmark_letter(model, tokenizer, prompt_format):
    cfg = mmlu_config(format=prompt_format)
    result = evaluate_benchmark(model, tokenizer, cfg, show_progress=False)
    questions, scores = independent_scores(model, tokenizer, cfg)
    assert [p.id for p in result.predictions] == [q.id for q in questions]
    assert [p.id for p in result.predictions][:2] == ["abstract_algebra/0", "abstract_algebra/1"]
    for found, question, expected in zip(result.predictions, questions, scores, strict=True):
        np.testing.assert_allclose(found.scores, expected, rtol=0, atol=1e-4)
        assert found.predicted == "ABCD"[int(np.argmax(expected))]
        assert found.gold == question.gold
        assert found.predicted_norm is None
    assert result.label == "mmlu"
    assert result.summary["questions"] == 6
    assert result.summary["acc"] == pytest.approx(np.mean([p.correct for p in result.predictions]))
    assert set(result.summary["categories"]) == {"STEM", "Social Sciences"}
    assert result.settings["split"] == "test"  # resolved from ""
    assert result.settings["scoring"] == "letter"
    assert result.settings["layout"] == "mmlu"
    table = markdown_table(result)
    for text in ("STEM", "Social Sciences", "abstract_algebra", "**all**", "letter"):
        assert text in table
    assert model.training is False


def test_evaluate_benchmark_option_text(model, tokenizer):
    cfg = mmlu_config(scoring=McScoring.option_text, shots=0, subjects=["abstract_algebra"], limit=4)
    result = evaluate_benchmark(model, tokenizer, cfg, show_progress=False)
    questions, scores = independent_scores(model, tokenizer, cfg)
    for found, question, expected in zip(result.predictions, questions, scores, strict=True):
        np.testing.assert_allclose(found.scores, expected, rtol=0, atol=1e-4)
        lengths = np.array([len(choice) for choice in question.choices], dtype=float)
        assert found.predicted == "ABCD"[int(np.argmax(expected))]
        assert found.predicted_norm == "ABCD"[int(np.argmax(np.array(expected) / lengths))]
    assert "acc_norm" in result.summary
    assert "acc_norm" in markdown_table(result)


SHARDED = mmlu_config(
    subjects=["abstract_algebra", "anatomy", "high_school_geography"], limit=3, batch_size=1
)


def _rank_main(rank: int, port: int, out_dir: str, zero3: bool) -> None:
    """One of two ranks: scores its share of the questions (with zero3, through a ZeRO-3 engine, each rank holding
    half of every parameter) and writes what it got back."""
    import torch.distributed as torch_dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "smollm2-135m-instruct")
        model = tiny_llama().eval()
        if zero3:
            import deepspeed

            config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
            model = deepspeed.initialize(model=model, config=config)[0].module
            assert model.lm_head.weight.numel() == 0  # partitioned: gathered for each forward
        forwards = []
        model.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
        result = evaluate_benchmark(model, tokenizer, SHARDED, synced=True, show_progress=False)
        predictions = [p.to_json() for p in result.predictions]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(
                {"predictions": predictions, "summary": result.summary, "forwards": len(forwards)}, handle
            )
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize(
    "zero3", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["replicated", "zero3"]
)
def test_two_ranks_equal_one(model, tokenizer, tmp_path, zero3):
    """Sharded over two ranks (9 questions, one per forward: rank 0 runs a forward more, and synced mode keeps rank 1
    in step until it is done; under ZeRO-3 rank 0's last forward needs rank 1's parameter shards), the gathered
    predictions are those of one process, in question order."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    multiprocessing.spawn(_rank_main, args=(port, str(tmp_path), zero3), nprocs=2, join=True)
    single = evaluate_benchmark(model, tokenizer, SHARDED, show_progress=False)
    expected = [p.to_json() for p in single.predictions]
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [p["id"] for p in record["predictions"]] == [p["id"] for p in expected]
        for found, wanted in zip(record["predictions"], expected, strict=True):
            np.testing.assert_allclose(found["scores"], wanted["scores"], rtol=0, atol=1e-4)
            assert found["predicted"] == wanted["predicted"]
        assert record["summary"] == single.summary
        assert record["forwards"] == 5  # rank 1 (4 questions) ran an idle forward while rank 0 scored its 5th
