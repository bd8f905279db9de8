"""What the trainer evaluates at an eval step: the token-weighted loss over the whole eval split, computed on every rank
under ZeRO-3, logged with the eval.benchmarks scores beside it."""

from __future__ import annotations

import math
from typing import Any

import torch

from ift_dist import dist
from ift_dist import engine as engine_lib
from ift_dist.attention import packed_forward_kwargs
from ift_dist.data.contracts import PackedBatch
from ift_dist.data.loader import PackedLoader
from ift_dist.data.render import pad_token_id
from ift_dist.metrics import RunLogger


def evaluate(
    engine: engine_lib.TrainEngine,
    loader: PackedLoader,
    backend: str,
    device: torch.device,
    step: int,
    tokenizer: Any,
) -> dict[str, Any]:
    """Token-weighted loss over the whole eval split, all ranks: sum of token losses / supervised tokens.

    Under ZeRO-3 every forward gathers parameters from all ranks, so ranks whose split is used up keep running
    forwards on an idle one-token batch (no supervised token) until every rank is done."""
    engine.eval()
    loss_sum, supervised = 0.0, 0
    batches = iter(loader)
    with torch.no_grad():
        while True:
            batch = next(batches, None)
            if not dist.any_rank(batch is not None):
                break
            if batch is None:
                batch = PackedBatch.idle(pad_token_id(tokenizer))
            kwargs = packed_forward_kwargs(batch, backend, device=device)
            loss_sum += float(engine(labels=batch.labels.to(device), **kwargs))
            supervised += batch.num_loss_tokens
    engine.train()
    total, tokens = dist.all_reduce([loss_sum, supervised])
    eval_loss = total / max(tokens, 1)
    return {
        "step": step,
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(min(eval_loss, 700.0)),
        "eval_tokens": int(tokens),
    }


def evaluate_and_log(step: int, *, log: RunLogger, eval_loss: Any, benchmarks: Any) -> dict[str, Any]:
    """Every rank: the eval loss and eval.benchmarks (each None when not configured) after `step`, logged; returns
    their metrics records merged (eval_loss, eval/<benchmark>/acc, ...)."""
    scores: dict[str, Any] = {}
    if eval_loss is not None:
        record = eval_loss(step=step)
        log.eval(record)
        scores.update(record)
    if benchmarks is not None:
        record = benchmarks(step=step)
        log.benchmarks(record)
        scores.update(record)
    return scores
