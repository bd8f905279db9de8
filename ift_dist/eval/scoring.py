"""McPrompts -> the log-likelihood of every continuation given its context, tokenised and truncated as
lm-evaluation-harness's HFLM does (lm_eval/api/model.py `_encode_pair`, models/huggingface.py `tok_encode` and
`_loglikelihood_tokens`), in right-padded batches.

One row of a forward pass is a `_Row`: its input ids and the positions whose next-token distribution is read.
    letter scoring   the continuations differ in their last token only (" A".." D", or "\nA".."\nD" after a chat
                     template): one row per prompt, all choices read on it (lm-eval's cache of continuations that
                     share context + continuation[:-1] gives the same numbers).
    otherwise        one row per (context, continuation): context + continuation without its last token, the
                     continuation's tokens read at the positions that predict them.
The vocabulary projection is applied to those positions only: the decoder gives hidden states [B, T, H], the
output embedding turns the gathered [N, H] into [N, V]; the [B, T, V] logits never exist, except for models whose
logits are not a plain projection of the last hidden state (soft-capping, scaling), which take the whole forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ift_dist import dist
from ift_dist.eval.records import McPrompt
from ift_dist.loss import LOGIT_SCALING_ATTRIBUTES, logit_softcap

logger = logging.getLogger(__name__)

# lm-eval's resolve_max_length: the config attributes that carry a context length, in the order they are read, the
# tokenizer's "no limit" sentinel, and the length used when nothing says one.
_CONTEXT_LENGTH_ATTRIBUTES = ("n_positions", "max_position_embeddings", "n_ctx")
_TOKENIZER_NO_LIMIT = int(1e30)
_DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class _Target:
    """One continuation scored on a row: its tokens and the row positions (indices into _Row.positions) that
    predict them."""

    choice: int
    reads: tuple[int, ...]
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class _Row:
    """One sequence of a forward pass and the continuations read on it."""

    prompt: int  # index into the prompts being scored
    input_ids: tuple[int, ...]
    positions: tuple[int, ...]  # where the next-token distribution is read
    targets: tuple[_Target, ...]
    truncated: bool = False  # the context lost its start to the model's length limit


def _prefix_token_id(tokenizer: Any) -> int | None:
    """The token lm-eval conditions on when the context is empty (BOS, else EOS)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _encode(tokenizer: Any, text: str) -> list[int]:
    """HFLM.tok_encode with add_bos_token unset: the tokenizer's own special tokens (Llama-3 prepends its BOS, SmolLM2
    and Qwen add nothing), none when the text already starts with the prefix token (a chat template's BOS)."""
    prefix = _prefix_token_id(tokenizer)
    starts_with_prefix = prefix is not None and text.startswith(tokenizer.decode(prefix))
    return tokenizer.encode(text, add_special_tokens=not starts_with_prefix)


def _split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval moves a context's trailing whitespace to the front of the continuation ("Answer: " + "A" is scored as
    "Answer:" + " A"), so the space is tokenised with the word it belongs to."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HFLM computes them for a causal model: the whole text is encoded
    and the continuation is what follows the context's own encoding. An empty context is the prefix token."""
    if not context:
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = _prefix_token_id(tokenizer)
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    context, continuation = _split_trailing_space(context, continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, _encode(tokenizer, context + continuation)[len(context_ids) :]


def max_length(model: Any, tokenizer: Any) -> int:
    """The longest input lm-eval feeds the model: the config's context length, else the tokenizer's, else 2048."""
    config = getattr(model.config, "text_config", None) or model.config
    for name in _CONTEXT_LENGTH_ATTRIBUTES:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != _TOKENIZER_NO_LIMIT:
        return int(limit)
    return _DEFAULT_MAX_LENGTH


def _rows_of_prompt(index: int, prompt: McPrompt, tokenizer: Any, length_limit: int) -> list[_Row]:
    if not prompt.continuations:
        raise ValueError(f"prompt {index} has no continuation to score: {prompt.context[-200:]!r}")
    pairs = [encode_pair(tokenizer, prompt.context, continuation) for continuation in prompt.continuations]
    for (_, continuation_ids), continuation in zip(pairs, prompt.continuations, strict=True):
        if not continuation_ids or len(continuation_ids) > length_limit:
            raise ValueError(
                f"prompt {index}: continuation {continuation!r} is {len(continuation_ids)} tokens "
                f"(1..{length_limit} can be scored)"
            )
    context_ids, first = pairs[0]
    if all(ids == context_ids and len(rest) == len(first) and rest[:-1] == first[:-1] for ids, rest in pairs):
        # The continuations differ in their last token only (" A".." D"; "\nA".."\nD" after a chat template's
        # trailing newline): every one is read on the same row, context + the shared tokens, whose truncation
        # (context + continuation)[-(L + 1):][:-1] does not depend on the last token.
        input_ids = (context_ids + first[:-1])[-length_limit:]
        reads = tuple(range(len(first)))
        positions = tuple(range(len(input_ids) - len(first), len(input_ids)))
        targets = tuple(_Target(choice, reads, tuple(ids)) for choice, (_, ids) in enumerate(pairs))
        truncated = len(context_ids) + len(first) > length_limit + 1
        return [_Row(index, tuple(input_ids), positions, targets, truncated)]
    rows = []
    for choice, (context_ids, continuation_ids) in enumerate(pairs):
        input_ids = (context_ids + continuation_ids)[-(length_limit + 1) :][:-1]
        count = len(continuation_ids)
        positions = tuple(range(len(input_ids) - count, len(input_ids)))
        rows.append(
            _Row(
                index,
                tuple(input_ids),
                positions,
                (_Target(choice, tuple(range(count)), tuple(continuation_ids)),),
                len(context_ids) + count > length_limit + 1,
            )
        )
    return rows


def _batches(rows: list[_Row], batch_size: int) -> Iterator[list[_Row]]:
    """Longest prompts first (an out-of-memory shows at once; little padding), the rows of a prompt together."""
    longest: dict[int, int] = {}
    for row in rows:
        longest[row.prompt] = max(longest.get(row.prompt, 0), len(row.input_ids))
    ordered = sorted(rows, key=lambda row: (-longest[row.prompt], row.prompt))
    for start in range(0, len(ordered), batch_size):
        yield ordered[start : start + batch_size]


def _projection_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder, output embedding) when the logits are the output embedding applied to the decoder's last hidden
    state; None for the models whose forward does more (soft-capping, a logit scale) or cannot be split."""
    if logit_softcap(model) is not None:
        return None
    config = model.config.get_text_config()
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_SCALING_ATTRIBUTES):
        return None
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else getattr(model, "model", None)
    head = model.get_output_embeddings()
    if decoder is None or decoder is model or head is None:
        return None
    return decoder, head


def _read_logits(
    model: Any, split: tuple[Any, Any] | None, rows: list[_Row], pad_id: int, device: torch.device
) -> torch.Tensor:
    """Log-probabilities [N, V] (float32) at the rows' read positions, in row order. One decoder call and one head
    call per batch, so ranks running ZeRO-3 gathers stay in step."""
    width = max(len(row.input_ids) for row in rows)
    ids_BT = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(rows), width), dtype=torch.long)
    row_index, position_index = [], []
    for number, row in enumerate(rows):
        ids_BT[number, : len(row.input_ids)] = torch.tensor(row.input_ids)
        mask_BT[number, : len(row.input_ids)] = 1
        row_index += [number] * len(row.positions)
        position_index += row.positions
    ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
    rows_N = torch.tensor(row_index, device=device)
    positions_N = torch.tensor(position_index, device=device)
    if split is None:
        logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False).logits
        logits_NV = logits_BTV[rows_N, positions_N]
    else:
        decoder, head = split
        hidden_BTH = decoder(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False).last_hidden_state
        logits_NV = head(hidden_BTH[rows_N, positions_N])
    return torch.log_softmax(logits_NV.float(), dim=-1)


def score_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[McPrompt],
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    synced: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Per prompt, per continuation: the summed log-probability of the continuation's tokens given the context.

    batch_size: rows per forward pass. progress(n): called after each batch with the number of prompts it
    finished. synced: ZeRO-3, where every forward gathers parameters from all ranks: a rank that has run out of
    rows keeps running forwards on a one-token batch until every rank has."""
    length_limit = max_length(model, tokenizer)
    rows = [
        row
        for index, prompt in enumerate(prompts)
        for row in _rows_of_prompt(index, prompt, tokenizer, length_limit)
    ]
    truncated = len({row.prompt for row in rows if row.truncated})
    if truncated:
        logger.warning(
            "%d of %d prompts are longer than the model's %d tokens: their contexts lose their start (as in lm-eval)",
            truncated,
            len(prompts),
            length_limit,
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    split = _projection_head(model)
    if split is None:
        logger.debug(
            "%s: scoring from the full logits (its forward changes them after the projection)",
            type(model).__name__,
        )
    scores = [[0.0] * len(prompt.continuations) for prompt in prompts]
    rows_left = [0] * len(prompts)
    for row in rows:
        rows_left[row.prompt] += 1
    idle = [_Row(-1, (pad_id,), (0,), ())]

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = _batches(rows, batch_size)
            while True:
                batch = next(batches, None)
                if not (dist.any_rank(batch is not None) if synced else batch is not None):
                    break
                log_probs_NV = _read_logits(model, split, batch or idle, pad_id, device)
                if batch is not None:
                    finished = _collect(batch, log_probs_NV, scores, rows_left)
                    if progress is not None:
                        progress(finished)
    finally:
        model.train(was_training)
    return scores


def _collect(
    batch: list[_Row], log_probs_NV: torch.Tensor, scores: list[list[float]], rows_left: list[int]
) -> int:
    """Adds each target's summed log-probability to `scores`; returns how many prompts the batch finished."""
    read_index, token_index, owners = [], [], []
    offset = 0
    for row in batch:
        for target in row.targets:
            read_index += [offset + read for read in target.reads]
            token_index += target.tokens
            owners += [(row.prompt, target.choice)] * len(target.tokens)
        offset += len(row.positions)
    device = log_probs_NV.device
    values = log_probs_NV[torch.tensor(read_index, device=device), torch.tensor(token_index, device=device)]
    for (prompt, choice), value in zip(owners, values.tolist(), strict=True):
        scores[prompt][choice] += value
    finished = 0
    for row in batch:
        rows_left[row.prompt] -= 1
        finished += rows_left[row.prompt] == 0
    return finished
