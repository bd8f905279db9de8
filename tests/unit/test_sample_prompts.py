"""The sample prompts answered during training: train.sampling (greedy by default, seeded sampling reproducible and
rank-independent, training's random state untouched), train.sample_prompts_file (.txt, JSONL; bad lines named by file
and line), the options' checks; on a tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as multiprocessing
from tiny_model import tiny_llama

from ift_dist.checkpoint.compat import config_changes
from ift_dist.config import ConfigError, check_paths, load_config, to_dict
from ift_dist.data.render import Renderer, load_tokenizer
from ift_dist.sample_prompts import (
    LISTED_SET,
    answer_prompts,
    describe_decoding,
    max_new_tokens,
    read_sample_prompts,
)

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo_cpu.yaml"
PROMPTS = ["Who are you?", "Write a haiku about gradient descent."]
CPU = torch.device("cpu")


def config(*overrides: str):
    """The demo's config (empty system prompt, SmolLM2's template) with these sample prompts and options."""
    listed = "train.sample_prompts=[" + ",".join(f"'{p}'" for p in PROMPTS) + "]"
    return load_config(DEMO_CONFIG, [listed, "train.sample_max_new_tokens=8", *overrides])


@pytest.fixture(scope="module")
def tokenizer(shared_dir):
    return load_tokenizer(shared_dir / "tokenizers" / "smollm2-135m-instruct")


def small_llama():
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
    return tiny_llama(num_hidden_layers=1, max_position_embeddings=256, **sizes).eval()


@pytest.fixture(scope="module")
def model():
    return small_llama()


def answers(model, tokenizer, cfg) -> list[str]:
    renderer = Renderer(tokenizer, cfg.data)
    return [answer for _, answer in answer_prompts(model, tokenizer, renderer, cfg, "sdpa", CPU)]


def test_the_same_seed_gives_the_same_answers_another_seed_others(model, tokenizer):
    sampled = config("train.sampling.temperature=1.0", "train.sampling.seed=7")
    first = answers(model, tokenizer, sampled)
    assert answers(model, tokenizer, sampled) == first
    torch.manual_seed(12345)  # the global random state plays no part
    assert answers(model, tokenizer, sampled) == first
    assert (
        answers(model, tokenizer, config("train.sampling.temperature=1.0", "train.sampling.seed=8")) != first
    )
    greedy = answers(model, tokenizer, config())
    assert first != greedy  # a random model's near-uniform distribution: a draw is not the argmax


def test_temperature_zero_is_greedy_decoding(model, tokenizer):
    cfg = config("train.sampling.temperature=0", "train.sampling.top_k=5", "train.sampling.top_p=0.5")
    renderer = Renderer(tokenizer, cfg.data)
    model.set_attn_implementation("sdpa")  # answer_prompts leaves the model set up for packed training rows
    expected = []
    for prompt in PROMPTS:
        inputs = tokenizer(renderer.generation_prompt(prompt), add_special_tokens=False, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=2)
        expected.append(
            tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )
    assert answers(model, tokenizer, cfg) == expected
    assert answers(model, tokenizer, config()) == expected  # the default


def test_sampling_leaves_the_global_random_state_as_it_was(tokenizer):
    model = small_llama()
    # A model whose forward draws from the global generator (as dropout would in training mode): still restored.
    model.register_forward_pre_hook(lambda module, args: torch.rand(1) and None)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    sampled = answers(model, tokenizer, config("train.sampling.temperature=0.8", "train.sampling.top_p=0.9"))
    assert torch.equal(torch.get_rng_state(), before)
    assert len(sampled) == 2 and model.training is False


def test_max_new_tokens_and_the_description_for_the_log():
    assert max_new_tokens(config().train) == 8  # train.sample_max_new_tokens
    assert max_new_tokens(config("train.sampling.max_new_tokens=3").train) == 3
    assert describe_decoding(config().train) == "greedy, up to 8 new tokens"
    sampled = config("train.sampling.temperature=0.7", "train.sampling.top_p=0.9", "train.sampling.seed=1")
    assert describe_decoding(sampled.train) == "temperature 0.7, top_p 0.9, seed 1, up to 8 new tokens"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("temperature=-0.1", "train.sampling.temperature"),
        ("top_p=0", "train.sampling.top_p"),
        ("top_p=1.5", "train.sampling.top_p"),
        ("top_k=-1", "train.sampling.top_k"),
        ("repetition_penalty=0", "train.sampling.repetition_penalty"),
        ("max_new_tokens=0", "train.sampling.max_new_tokens"),
    ],
)
def test_out_of_range_options_are_named_by_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config(f"train.sampling.{override}")


def with_file(path: Path) -> object:
    return config(f"train.sample_prompts_file={path}").train


def test_prompts_from_a_text_file_and_a_jsonl_file_follow_the_listed_ones(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("Name three colours.\n\n  What is 2+2?  \n")
    prompts = read_sample_prompts(with_file(text))
    assert [p.turns[0] for p in prompts] == [*PROMPTS, "Name three colours.", "What is 2+2?"]
    assert [(p.set, p.id) for p in prompts[:2]] == [(LISTED_SET, "0"), (LISTED_SET, "1")]
    records = [
        {"prompt": "Tell a joke.", "id": "joke"},
        {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]},
        {"instruction": "Translate to French.", "input": "Good morning"},
    ]
    lines = tmp_path / "prompts.jsonl"
    lines.write_text("".join(json.dumps(record) + "\n" for record in records))
    prompts = read_sample_prompts(with_file(lines))[2:]
    assert [p.turns[0] for p in prompts] == ["Tell a joke.", "Hi!", "Translate to French.\n\nGood morning"]
    assert [p.id for p in prompts] == ["joke", "1", "2"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "fine"}\n{"prompt": \n', r"prompts\.jsonl:2: not JSON"),
        ('{"prompt": "fine"}\n\n{"prompt": "  "}\n', r"prompts\.jsonl:3: prompt: empty"),
        ('{"text": "no prompt"}\n', r"prompts\.jsonl:1: messages: missing"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
         '{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}\n', r"prompt 0: 2 user turns"),
        ('{"prompt": "a", "system": "You are terse."}\n', r"prompt 0: has a system prompt"),
    ],
)  # fmt: skip
def test_a_bad_prompt_file_is_a_config_error_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"^train\.sample_prompts_file: .*" + message):
        read_sample_prompts(with_file(path))


def test_a_missing_prompt_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.sample_prompts_file: .*missing\.txt is not a file"):
        read_sample_prompts(with_file(tmp_path / "missing.txt"))


def _rank_main(rank: int, port: int, tokenizer_dir: str, out_dir: str) -> None:
    """One of two ranks, each with its own global random state: the sampled answers, generated in step."""
    import torch.distributed as torch_dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, tokenizer = small_llama(), load_tokenizer(tokenizer_dir)
        torch.manual_seed(100 + rank)
        cfg = config("train.sampling.temperature=1.0", "train.sampling.top_k=50", "train.sampling.seed=5")
        sampled = answers(model, tokenizer, cfg)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(sampled))
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_sample_the_same_answers(shared_dir, tokenizer, model, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tokenizer_dir = str(shared_dir / "tokenizers" / "smollm2-135m-instruct")
    multiprocessing.spawn(_rank_main, args=(port, tokenizer_dir, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    single = answers(model, tokenizer, config("train.sampling.temperature=1.0", "train.sampling.top_k=50",
                                              "train.sampling.seed=5"))  # fmt: skip
    assert ranks[0] == ranks[1] == single


def test_the_prompt_file_is_checked_before_any_rank_starts_and_a_resume_may_change_the_options(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)  # the demo config's paths are relative to the repository root
    with pytest.raises(ConfigError, match=r"^train\.sample_prompts_file: .*missing\.txt does not exist"):
        check_paths(config(f"train.sample_prompts_file={tmp_path / 'missing.txt'}"))
    (tmp_path / "prompts.txt").write_text("Hi\n")
    changed = config(
        f"train.sample_prompts_file={tmp_path / 'prompts.txt'}", "train.sampling.temperature=0.7"
    )
    check_paths(changed)
    refused, allowed = config_changes(to_dict(config()), to_dict(changed))
    assert refused == [] and "train.sampling.temperature" in allowed
