"""Answers to the sample prompts (train.sample_prompts, train.sample_prompts_file) during training, decoded as
train.sampling says by the model being trained.

Every rank generates every answer: under ZeRO-3 each forward gathers the layers from all ranks, and transformers keeps
the ranks in step (synced_gpus) as long as they generate the same tokens. A sampled answer (temperature > 0) therefore
draws from its own generator, seeded by (train.sampling.seed, the prompt's set and id), never from the global random
state: eval/generate.py's SeededSampler turns greedy decoding into a draw (the Gumbel-max trick). The same seed gives
the same answers on every rank and in every run, and training's random state, which exact resume restores bit for bit,
is untouched; it is saved and restored around generation all the same, in case a model's generate draws from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ift_dist import dist
from ift_dist.attention import enable_packed_attention
from ift_dist.config import Config, ConfigError, TrainConfig
from ift_dist.data.render import Renderer, pad_token_id
from ift_dist.eval.generate import GREEDY_BELOW, SeededSampler, row_seed
from ift_dist.eval.prompt_sets import EvalPrompt, PromptSetError, load_prompt_set

# The set name of the prompts listed in train.sample_prompts: with a prompt's index, it keys the prompt's seed.
LISTED_SET = "train.sample_prompts"


def read_sample_prompts(train: TrainConfig) -> list[EvalPrompt]:
    """train.sample_prompts, then the prompts of train.sample_prompts_file (read now: a bad line is a ConfigError
    naming file:line before the model loads). A sample prompt is one user message: data.system_prompt applies."""
    prompts = [
        EvalPrompt(str(index), LISTED_SET, None, [text]) for index, text in enumerate(train.sample_prompts)
    ]
    if not train.sample_prompts_file:
        return prompts
    key, path = "train.sample_prompts_file", Path(train.sample_prompts_file)
    if not path.is_file():
        raise ConfigError(f"{key}: {path} is not a file")
    try:
        loaded = load_prompt_set(str(path))
    except PromptSetError as error:
        raise ConfigError(f"{key}: {error}") from None
    for prompt in loaded:
        # Training renders one user message with data.system_prompt's rule: a record's own turns or system
        # prompt would not be what the answer shows.
        if len(prompt.turns) != 1:
            raise ConfigError(
                f"{key}: {path}: prompt {prompt.id}: {len(prompt.turns)} user turns; a sample prompt is one"
            )
        if prompt.system is not None:
            raise ConfigError(
                f"{key}: {path}: prompt {prompt.id}: has a system prompt; sample prompts are rendered with "
                "data.system_prompt, as training renders its samples"
            )
    return prompts + loaded


def max_new_tokens(train: TrainConfig) -> int:
    """train.sampling.max_new_tokens, else train.sample_max_new_tokens."""
    return train.sampling.max_new_tokens or train.sample_max_new_tokens


def describe_decoding(train: TrainConfig) -> str:
    """How the answers are decoded, for the log: "greedy, up to 64 new tokens", "temperature 0.7, ...", ..."""
    options = train.sampling
    parts = ["greedy"] if options.temperature < GREEDY_BELOW else [f"temperature {options.temperature}"]
    if options.temperature >= GREEDY_BELOW:
        parts += [f"top_p {options.top_p}"] if options.top_p < 1 else []
        parts += [f"top_k {options.top_k}"] if options.top_k > 0 else []
        parts += [f"seed {options.seed}"]
    parts += [f"repetition_penalty {options.repetition_penalty}"] if options.repetition_penalty != 1 else []
    return ", ".join([*parts, f"up to {max_new_tokens(train)} new tokens"])


def answer_prompts(
    model: Any,
    tokenizer: Any,
    renderer: Renderer,
    cfg: Config,
    backend: str,
    device: torch.device,
    prompts: list[EvalPrompt] | None = None,
) -> list[tuple[str, str]]:
    """(prompt, answer) for each sample prompt (read_sample_prompts(cfg.train) when `prompts` is None), prompted as
    training renders prompts (Renderer.generation_prompt). Every rank calls it; rank 0 reports."""
    prompts = read_sample_prompts(cfg.train) if prompts is None else prompts
    was_training = model.training
    model.eval()
    model.set_attn_implementation("sdpa")  # generation runs unpacked
    answers = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for prompt in prompts:
                (question,) = prompt.turns
                text = renderer.generation_prompt(question)  # data.system_prompt included
                answers.append((question, _answer(model, tokenizer, text, prompt, cfg.train, device)))
    finally:
        enable_packed_attention(model, backend)
        model.train(was_training)
    return answers


def _answer(
    model: Any, tokenizer: Any, text: str, prompt: EvalPrompt, train: TrainConfig, device: torch.device
) -> str:
    """One answer: greedy generate, made a seeded draw by SeededSampler when the temperature is above 0."""
    from transformers import LogitsProcessorList

    options = train.sampling
    sampler = None
    if options.temperature >= GREEDY_BELOW:
        seed = row_seed(options.seed, prompt, 0, 0)
        sampler = LogitsProcessorList(
            [SeededSampler([options.temperature], [seed], options.top_k, options.top_p)]
        )
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens(train),
            do_sample=False,  # SeededSampler samples; transformers' own sampling would draw from the global RNG
            repetition_penalty=options.repetition_penalty,
            logits_processor=sampler,
            use_cache=True,
            pad_token_id=pad_token_id(tokenizer),
            synced_gpus=dist.world_size() > 1,
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
