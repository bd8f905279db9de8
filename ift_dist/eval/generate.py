"""EvalPrompts -> the model's answers (answers.jsonl records), generated on every rank with the tokenizer's chat
template, in left-padded batches, resumable.

A record (Answer.to_json) is the answers.jsonl contract that `ift eval ifeval` and `ift eval judge` read.

Work: every (prompt, sample) not in done_ids is a row; row i is answered by rank i % W (round-robin). All ranks walk
the same number of steps, a step being one batch of rows per rank; after each step the finished rows are gathered
(all_gather_object) and handed to on_batch on rank 0, so a crash keeps every finished step. Because rank r's k-th
row is global row r + W*k, one step finishes the contiguous rows [W*B*s, W*B*(s+1)): the file grows in prompt order.

Turns: turn k of a batch is one generate call over the rows that have a turn k, each rendered with the model's own
answers to turns 1..k-1 (MT-bench's second question follows its own first answer).

Sampling (temperature > 0) must not depend on which rows share a batch or a rank. transformers' sampling draws
from the global RNG for the whole batch, so it would. Instead generate runs greedy and SeededSampler turns the argmax
into a sample: per row it applies temperature, top-k, top-p and adds Gumbel noise drawn from the row's own generator,
seeded by (seed, prompt id, sample, turn); argmax(log p + Gumbel) is a draw from p (the Gumbel-max trick). A row's
noise at step t is then the same whatever batch it is in; greedy rows (temperature 0) get no noise. Same device
kind and batch-independent logits assumed: padding changes the logits at the level of float rounding only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ift_dist import dist
from ift_dist.eval.prompt_sets import EvalPrompt

logger = logging.getLogger(__name__)

GENERATION_FILE = "generation.json"
# FastChat llm_judge (common.py `temperature_config`): MT-bench's sampling temperature per category, used when the
# user gives none. Below GREEDY_BELOW a temperature means greedy decoding, as FastChat's gen_model_answer does.
MT_BENCH_TEMPERATURES = {
    "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
    "stem": 0.1, "humanities": 0.1,
}  # fmt: skip
GREEDY_BELOW = 1e-4


@dataclass(frozen=True)
class SamplingConfig:
    """How answers are decoded. temperature None: MT-bench's per-category table for mt_bench, else greedy."""

    temperature: float | None = None  # 0 = greedy; None = the set's default (above)
    top_p: float = 1.0  # nucleus sampling mass, (0, 1]; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    repetition_penalty: float = 1.0  # CTRL's penalty on tokens already in the sequence; 1 = off
    max_new_tokens: int = 512  # per turn
    seed: int = 1234  # with (prompt id, sample, turn) seeds each sampled row's own generator

    def __post_init__(self) -> None:
        checks = {
            "temperature": self.temperature is None or self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "repetition_penalty": self.repetition_penalty > 0,
            "max_new_tokens": self.max_new_tokens >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"sampling.{name}: {getattr(self, name)!r} is out of range")

    def temperature_for(self, prompt: EvalPrompt) -> float:
        if self.temperature is not None:
            return self.temperature
        if prompt.set == "mt_bench":
            return MT_BENCH_TEMPERATURES.get(prompt.category or "", 0.7)  # FastChat's default for others
        return 0.0

    def record(self, temperature: float) -> dict[str, Any]:
        """The settings one answer was decoded with (the contract's "sampling")."""
        return {**asdict(self), "temperature": temperature, "do_sample": temperature >= GREEDY_BELOW}


@dataclass
class Answer:
    """One (prompt, sample): the user turns, the model's answer to each, and how each ended."""

    prompt: EvalPrompt
    sample: int
    sampling: dict[str, Any]
    model: str
    answers: list[str] = field(default_factory=list)
    # "stop" (a stop token ended it) or "length" (max_new_tokens did)
    finish_reasons: list[str] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)  # the whole rendered conversation up to this turn
    completion_tokens: list[int] = field(default_factory=list)  # generated, the stop token included

    def to_json(self) -> dict[str, Any]:
        p = self.prompt
        return {
            "id": p.id, "set": p.set, "category": p.category, "turns": p.turns, "system": p.system,
            "answers": self.answers, "reference": p.reference, "finish_reasons": self.finish_reasons,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "sample": self.sample, "sampling": self.sampling, "model": self.model,
        }  # fmt: skip


def chat_template(tokenizer: Any) -> str:
    """The template string prompts are rendered with; an error for a tokenizer without one."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "the tokenizer has no chat template: use an instruct model's tokenizer (--tokenizer)"
        )
    return template if isinstance(template, str) else tokenizer.get_chat_template()


def render_prompt(tokenizer: Any, prompt: EvalPrompt, answers: Sequence[str], turn: int) -> str:
    """The conversation up to user turn `turn` (0-based) after the model's own `answers`, ready for the reply."""
    # An empty system prompt is a system message too: it keeps a template's default one out (SmolLM2's, Qwen's), as
    # data.system_prompt: "" does in training.
    messages = [{"role": "system", "content": prompt.system}] if prompt.system is not None else []
    for asked, answered in zip(prompt.turns[:turn], answers[:turn], strict=True):
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    messages.append({"role": "user", "content": prompt.turns[turn]})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # jinja's TemplateError (a template that refuses a system message, ...)
        raise ValueError(f"prompt {prompt.id}: the chat template cannot render it: {error}") from error


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end an answer: the model's generation eos ids (Llama-3: <|eot_id|> and <|end_of_text|>)
    and the tokenizer's eos."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in [*ids, tokenizer.eos_token_id] if i is not None]
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer names an eos token")
    return list(dict.fromkeys(ids))


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[EvalPrompt],
    sampling: SamplingConfig,
    *,
    batch_size: int,
    num_samples: int = 1,
    done_ids: set[tuple[str, int]] | frozenset[tuple[str, int]] = frozenset(),
    device: Any = None,
    show_progress: bool = True,
    synced: bool = False,
    on_batch: Callable[[list[Answer]], None] | None = None,
    model_name: str = "",
) -> list[Answer]:
    """Every rank calls it; every rank returns the Answers of all rows not in done_ids, in prompt then sample order.
    on_batch(answers): on rank 0, after each step, with the rows that step finished (in order): append them.
    synced: ZeRO-3 (parameters gathered in every forward): all ranks run the same generate calls, an idle
    one-token generate where a rank has nothing left, and generate keeps them in step (synced_gpus)."""
    if batch_size < 1 or num_samples < 1:
        raise ValueError(f"batch_size ({batch_size}) and num_samples ({num_samples}) must be at least 1")
    chat_template(tokenizer)  # a tokenizer without one fails before any work
    rows = [(p, s) for p in prompts for s in range(num_samples) if (p.id, s) not in done_ids]
    rank, world = (dist.rank(), dist.world_size()) if dist.is_initialized() else (0, 1)
    synced = synced and world > 1
    mine = list(range(rank, len(rows), world))
    steps = math.ceil(math.ceil(len(rows) / world) / batch_size) if rows else 0  # the same on every rank
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    logger.info(
        "generating %d answers (%d prompts x %d samples, %d done) over %d ranks, %d on this one, batch %d",
        len(rows), len(prompts), num_samples, len(prompts) * num_samples - len(rows), world, len(mine), batch_size,
    )  # fmt: skip
    if num_samples > 1 and sampling.temperature == 0:
        logger.warning(
            "%d samples per prompt with greedy decoding (temperature 0): they will be equal", num_samples
        )
    finished: list[Answer] = []
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(mine), desc="generate", unit="answer", disable=not show_progress or rank != 0)
    try:
        for step in range(steps):
            batch = []
            for index in mine[step * batch_size : (step + 1) * batch_size]:
                prompt, sample = rows[index]
                temperature = sampling.temperature_for(prompt)
                batch.append((index, Answer(prompt, sample, sampling.record(temperature), model_name)))
            turns = max((len(answer.prompt.turns) for _, answer in batch), default=0)
            if synced:
                turns = int(dist.all_reduce([float(turns)], "max")[0])
            for turn in range(turns):
                active = [answer for _, answer in batch if len(answer.prompt.turns) > turn]
                if active:
                    _answer_turn(model, tokenizer, active, turn, sampling, stops, pad_id, device, synced)
                elif synced:
                    _idle_generate(model, pad_id, device)
            gathered = _gather(batch, world)
            finished += gathered
            if on_batch is not None and rank == 0:
                on_batch(gathered)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return finished


def _gather(batch: list[tuple[int, Answer]], world: int) -> list[Answer]:
    """This step's rows of every rank, in row order (they are contiguous: see the module docstring)."""
    if world > 1:
        import torch.distributed as torch_dist

        shares: list[list[tuple[int, Answer]]] = [[] for _ in range(world)]
        torch_dist.all_gather_object(shares, batch)
        batch = [row for share in shares for row in share]
    return [answer for _, answer in sorted(batch, key=lambda row: row[0])]


def _answer_turn(
    model: Any, tokenizer: Any, answers: list[Answer], turn: int, sampling: SamplingConfig,
    stops: list[int], pad_id: int, device: torch.device, synced: bool,
) -> None:  # fmt: skip
    """One generate call: turn `turn` of every row in `answers`, left-padded; appends each row's answer."""
    from transformers import GenerationConfig, LogitsProcessorList

    encoded = [
        tokenizer(render_prompt(tokenizer, a.prompt, a.answers, turn), add_special_tokens=False)["input_ids"]
        for a in answers
    ]  # the template writes BOS itself where the model wants one
    width = max(len(ids) for ids in encoded)
    input_BT = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):  # left padding: every row's last prompt token is at the end
        input_BT[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask_BT[row, width - len(ids) :] = 1
    temperatures = [a.sampling["temperature"] for a in answers]
    sampler = None
    if any(t >= GREEDY_BELOW for t in temperatures):
        seeds = [row_seed(sampling.seed, a.prompt, a.sample, turn) for a in answers]
        sampler = LogitsProcessorList([SeededSampler(temperatures, seeds, sampling.top_k, sampling.top_p)])
    # Every decoding setting explicit: the model's generation_config fills only what is left unset.
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens, do_sample=False, num_beams=1,
        repetition_penalty=sampling.repetition_penalty, eos_token_id=stops, pad_token_id=pad_id,
    )  # fmt: skip
    with torch.no_grad():
        output_BT = model.generate(
            input_ids=input_BT.to(device), attention_mask=mask_BT.to(device), generation_config=config,
            logits_processor=sampler, synced_gpus=synced,
        )  # fmt: skip
    stop_set = set(stops)
    for answer, ids, new in zip(answers, encoded, output_BT[:, width:].tolist(), strict=True):
        end = next((position for position, token in enumerate(new) if token in stop_set), None)
        text_ids = new if end is None else new[:end]
        answer.answers.append(tokenizer.decode(text_ids, skip_special_tokens=True).strip())
        answer.finish_reasons.append("length" if end is None else "stop")
        answer.prompt_tokens.append(len(ids))
        answer.completion_tokens.append(len(new) if end is None else end + 1)


def _idle_generate(model: Any, pad_id: int, device: torch.device) -> None:
    """A one-token generate on a rank without rows, so ZeRO-3's parameter gathers of the others are matched; with
    synced_gpus it keeps running forwards until every rank's generate has ended."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=1, do_sample=False, num_beams=1, pad_token_id=pad_id)
    one = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    with torch.no_grad():
        model.generate(
            input_ids=one, attention_mask=torch.ones_like(one), generation_config=config, synced_gpus=True
        )


def row_seed(seed: int, prompt: EvalPrompt, sample: int, turn: int) -> int:
    """A 63-bit seed from (seed, set, id, sample, turn), stable across processes (unlike hash())."""
    key = f"{seed}\0{prompt.set}\0{prompt.id}\0{sample}\0{turn}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


class SeededSampler:
    """A logits processor for greedy generate that makes each sampled row's argmax a draw from its warped
    distribution: temperature, top-k, top-p (transformers' own warpers, one row at a time), then Gumbel noise from
    the row's generator. Rows with temperature 0 pass through untouched (greedy)."""

    def __init__(self, temperatures: list[float], seeds: list[int], top_k: int, top_p: float) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.seeds = seeds
        self.generators: list[torch.Generator | None] = []  # made on the logits' device at the first step
        self.warpers = []
        for temperature in temperatures:
            chain = [TemperatureLogitsWarper(temperature)] if temperature >= GREEDY_BELOW else []
            if chain and top_k > 0:
                chain.append(TopKLogitsWarper(top_k))
            if chain and top_p < 1.0:
                chain.append(TopPLogitsWarper(top_p))
            self.warpers.append(chain)

    def __call__(self, input_ids_BT: torch.Tensor, scores_BV: torch.Tensor) -> torch.Tensor:
        if not self.generators:
            self.generators = [
                torch.Generator(device=scores_BV.device).manual_seed(seed) if chain else None
                for seed, chain in zip(self.seeds, self.warpers, strict=True)
            ]
        scores_BV = scores_BV.float().clone()
        for row, (chain, generator) in enumerate(zip(self.warpers, self.generators, strict=True)):
            if generator is None:
                continue
            row_1V = scores_BV[row : row + 1]
            for warper in chain:
                row_1V = warper(input_ids_BT[row : row + 1], row_1V)
            uniform_V = torch.rand(row_1V.shape[-1], generator=generator, device=scores_BV.device)
            # -log(-log(u)) is Gumbel(0, 1); u = 0 gives -inf, a token never drawn (probability 2**-24 per token).
            scores_BV[row] = row_1V[0] - torch.log(-torch.log(uniform_V))
        return scores_BV


def write_generation_meta(
    out_dir: str | Path, *, model_name: str, set_name: str, prompts_file: str | Path, chat_template: str,
    sampling: SamplingConfig, num_samples: int,
) -> Path:  # fmt: skip
    """out_dir/generation.json: what the answers were generated from and with (rank 0)."""
    record = {
        "model": model_name, "set": set_name, "prompts_file": str(prompts_file), "chat_template": chat_template,
        "sampling": asdict(sampling), "num_samples": num_samples,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    path = Path(out_dir) / GENERATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path
