"""Held-out perplexity of a causal LM on record files, counted exactly as training counts its eval loss.

The samples come from the trainer's own eval loader (`build_loader(split="eval")` over the files): the same records
(bad ones skipped or fatal by data.on_bad_record, reported by the same scan), the same rendering (the run's chat
template, system prompt, data.supervise, data.overlong) and the same assistant-only labels, dealt over the ranks the
same way. The loss of a supervised token is -log p(label) after the usual shift (ift_dist.loss.shift_labels);
sums and counts are kept per source and summed over ranks, so loss = sum of token losses / supervised tokens, and
perplexity = exp(loss), weighted by tokens, not by samples.

Two kinds of model are scored:
    a stock HF model (sdpa, eager, ...)       one sample per row, right-padded, with an attention mask
    a model with packed attention enabled     packed rows (data.packing) with their sample boundaries
                                              (ift_dist.attention.packed_forward_kwargs), as the trainer runs it
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ift_dist import dist
from ift_dist.attention import REGISTERED_NAMES, packed_forward_kwargs
from ift_dist.config import ConfigError, DataConfig, SourceConfig
from ift_dist.data.contracts import IGNORE_INDEX, PackedBatch
from ift_dist.data.loader import build_loader, scan_sources
from ift_dist.data.render import pad_token_id
from ift_dist.loss import check_fused_supported, logit_softcap, shift_labels

logger = logging.getLogger(__name__)

# Supervised positions whose logits are turned into fp32 log-probabilities at a time: bounds the fp32 copy of the
# [N, V] logits (4096 x 152k vocabulary x 4 bytes = 2.5 GB).
LOGIT_CHUNK = 4096

# exp() of a larger loss overflows a float; train.evaluate caps it the same way.
MAX_EXPONENT = 700.0


# --------------------------------------------------------------------------------------------- configuration


def data_config_for(
    files: Sequence[str],
    *,
    text_files: Sequence[str] = (),
    base: DataConfig | None = None,
    tokenizer: str | None = None,
    template: str | None = None,
    max_length: int | None = None,
) -> DataConfig:
    """The data section that scores `files`: each file its own source (named by its stem, the format detected per
    file as training does), everything else (template, system_prompt, supervise, max_length, overlong, ...) from
    `base` (a run's data section) or the defaults; the explicit arguments override both. `text_files` are raw-text
    sources (format text, as training reads them: every token scored, documents cut into max_length chunks, EOS
    appended). There is no eval split: every record of the files is scored. Raises ConfigError for a bad value, named
    by its data.* key."""
    if not files and not text_files:
        raise ConfigError("data: no files to score")
    data = dataclasses.replace(base) if base is not None else DataConfig()
    names = _source_names([*files, *text_files])
    data.sources = [
        SourceConfig(path=str(path), name=name, format="text" if index >= len(files) else "auto")
        for index, (path, name) in enumerate(names)
    ]
    data.eval_sources, data.eval_fraction, data.prepared = [], 0.0, None
    if tokenizer is not None:
        data.tokenizer = tokenizer
    if template is not None:  # the run's raw Jinja template (data.chat_template) gives way to the one chosen
        data.template, data.chat_template = template, None
    if max_length is not None:
        data.max_length = max_length
    data.validate("data")
    return data


def _source_names(files: Sequence[str]) -> list[tuple[str, str | None]]:
    """(path, source name): the file's stem; a stem that two files share is prefixed with the parent directory's
    name. A glob keeps training's default name (None)."""
    paths = [Path(file) for file in files]
    stems = [None if any(mark in str(path) for mark in "*?[") else path.stem for path in paths]
    names = []
    for path, stem in zip(paths, stems, strict=True):
        shared = stem is not None and stems.count(stem) > 1
        names.append(f"{path.parent.name}/{stem}" if shared else stem)
    given = [name for name in names if name is not None]
    repeated = sorted({name for name in given if given.count(name) > 1})
    if repeated:
        raise ConfigError(f"data.sources: several files would be named {', '.join(repeated)}; rename them")
    return [(str(path), name) for path, name in zip(files, names, strict=True)]


# --------------------------------------------------------------------------------------------- result


@dataclass
class PerplexityResult:
    """Token-weighted loss and perplexity over the supervised tokens, per source and in total (every rank alike).

    A source's entry: loss, perplexity, tokens (supervised), samples (scored), records (valid records of the
    file), dropped (valid records that gave no sample: too long, nothing supervised, ...), bad_records (records
    that are not a conversation, skipped by data.on_bad_record=skip)."""

    sources: dict[str, dict[str, float]]
    loss: float
    perplexity: float
    tokens: int
    samples: int
    dropped: int = 0
    bad_records: int = 0
    settings: dict[str, Any] = field(default_factory=dict)  # template, max_length, ...: what was scored how

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; a loss without tokens (NaN) becomes null."""
        return _finite(dataclasses.asdict(self))


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _loss_and_perplexity(loss_sum: float, tokens: float) -> tuple[float, float]:
    if tokens <= 0:
        return math.nan, math.nan
    loss = loss_sum / tokens
    return loss, math.exp(min(loss, MAX_EXPONENT))


# --------------------------------------------------------------------------------------------- evaluation


def evaluate_perplexity(
    model: Any,
    tokenizer: Any,
    data: DataConfig,
    *,
    device: Any = None,
    batch_rows: int = 4,
    synced: bool = False,
    show_progress: bool = True,
) -> PerplexityResult:
    """Every rank: score this rank's share of the records of `data.sources` and return the totals of all ranks.

    model: a Hugging Face causal LM, stock or with packed attention enabled (`attention.enable_packed_attention`),
    on `device` (default: where its parameters are). batch_rows: rows per forward pass. synced: ZeRO-3, where every
    forward gathers parameters from all ranks: a rank whose share is done runs idle forwards until all are.
    Raises BadRecordError (data.on_bad_record=error) and DataFileError as training does, ValueError when no
    record gives a sample."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world_size = dist.rank(), dist.world_size()
    backend = packed_backend(model)
    scanned = scan_sources(data.sources, data.on_bad_record)
    names = [item.scan.name for item in scanned]
    if len(set(names)) != len(names):
        raise ValueError(f"two data sources share a name ({', '.join(names)}); their scores would mix")
    # The trainer's eval split over these sources; a stock model's attention cannot keep packed samples apart.
    eval_data = dataclasses.replace(
        data, eval_sources=list(data.sources), eval_fraction=0.0, prepared=None,
        packing=data.packing and backend is not None,
    )  # fmt: skip
    loader = build_loader(
        eval_data, tokenizer, rank=rank, world_size=world_size, rows_per_batch=batch_rows, split="eval",
        scanned=scanned,
    )  # fmt: skip
    source_index = {name: number for number, name in enumerate(names)}
    loss_sums = torch.zeros(len(names), dtype=torch.float64)
    tokens = torch.zeros(len(names), dtype=torch.float64)
    samples = torch.zeros(len(names), dtype=torch.float64)
    bar = _progress_bar(len(range(rank, loader.plan.length, world_size)), show_progress)
    head = _loss_head(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = iter(loader)
            while True:
                batch = next(batches, None)
                if synced and not dist.any_rank(batch is not None):
                    break
                if batch is None and not synced:
                    break
                if batch is None:  # synced: this rank is done, the others still need its parameter shards
                    _token_losses(model, head, PackedBatch.idle(pad_token_id(tokenizer)), backend, device)
                    continue
                losses_N, sources_N = _token_losses(model, head, batch, backend, device, source_index)
                loss_sums.index_add_(0, sources_N, losses_N)
                tokens += torch.bincount(sources_N, minlength=len(names)).double()
                for ref in (ref for row in batch.refs for ref in row):
                    samples[source_index[ref.source]] += 1
                _advance(bar, loader)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    report = loader.report()
    if report["dropped"] or report["bad_records"]:
        logger.info(
            "perplexity, rank %d: dropped samples %s, bad records %s",
            rank, report["dropped"] or "none", report["bad_records"] or "none",
        )  # fmt: skip
    totals = dist.all_reduce([*loss_sums.tolist(), *tokens.tolist(), *samples.tolist()])
    count = len(names)
    loss_sums_all, tokens_all, samples_all = totals[:count], totals[count : 2 * count], totals[2 * count :]
    if sum(samples_all) == 0:
        raise ValueError(f"no record of {', '.join(names)} gave a sample to score: {report}")
    return _result(scanned, loss_sums_all, tokens_all, samples_all, eval_data, backend)


def _result(
    scanned: Sequence[Any],
    loss_sums: list[float],
    tokens: list[float],
    samples: list[float],
    data: DataConfig,
    backend: str | None,
) -> PerplexityResult:
    sources = {}
    for item, loss_sum, count, scored in zip(scanned, loss_sums, tokens, samples, strict=True):
        loss, perplexity = _loss_and_perplexity(loss_sum, count)
        valid = len(item.scan.valid_indices)
        sources[item.scan.name] = {
            "loss": loss,
            "perplexity": perplexity,
            "tokens": int(count),
            "samples": int(scored),
            "records": valid,
            "dropped": valid - int(scored),
            "bad_records": len(item.scan.bad),
        }
    loss, perplexity = _loss_and_perplexity(sum(loss_sums), sum(tokens))
    settings = {
        "template": str(data.template),
        "system_prompt": data.system_prompt,
        "supervise": str(data.supervise),
        "max_length": data.max_length,
        "overlong": str(data.overlong),
        "packing": data.packing,
        "attention": backend or "stock",
    }
    return PerplexityResult(
        sources=sources,
        loss=loss,
        perplexity=perplexity,
        tokens=int(sum(tokens)),
        samples=int(sum(samples)),
        dropped=sum(int(entry["dropped"]) for entry in sources.values()),
        bad_records=sum(int(entry["bad_records"]) for entry in sources.values()),
        settings=settings,
    )


def packed_backend(model: Any) -> str | None:
    """The packed-attention backend the model runs (ift_dist.attention), or None for a stock attention."""
    name = getattr(model.config, "_attn_implementation", None)
    return next((backend for backend, registered in REGISTERED_NAMES.items() if registered == name), None)


# --------------------------------------------------------------------------------------------- one forward pass


@dataclass(frozen=True)
class _Head:
    """The output embedding applied to the supervised hidden states only, so the [B, T, V] logits never exist."""

    module: (
        Any  # model.get_output_embeddings(): called as a module, so ZeRO-3 gathers its weight around the call
    )
    softcap: float | None


def _loss_head(model: Any) -> _Head | None:
    """The output embedding when the logits are hidden @ W.T (+ b), up to soft-capping; None when the model
    rescales them in its forward (then its full logits are used)."""
    if getattr(model, "base_model", model) is model:
        return None
    try:
        check_fused_supported(model)
    except ValueError:
        return None
    return _Head(model.get_output_embeddings(), logit_softcap(model))


def _forward_kwargs(batch: PackedBatch, backend: str | None, device: torch.device) -> dict[str, Any]:
    if backend is not None:
        return packed_forward_kwargs(batch, backend, device=device)
    if any(len(lengths) != 1 for lengths in batch.seq_lens):
        raise ValueError("a stock attention scores one sample per row; the rows are packed")
    lengths_B = torch.tensor([lengths[0] for lengths in batch.seq_lens])
    width = batch.input_ids.shape[1]
    attention_mask_BT = (torch.arange(width)[None, :] < lengths_B[:, None]).long()
    return {
        "input_ids": batch.input_ids.to(device),
        "attention_mask": attention_mask_BT.to(device),
        "position_ids": batch.position_ids.to(device),
        "use_cache": False,
    }


def _token_losses(
    model: Any,
    head: _Head | None,
    batch: PackedBatch,
    backend: str | None,
    device: torch.device,
    source_index: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p(target) of every supervised target of the batch, float64 on the CPU, and the source number of each
    (by the sample its position belongs to; the trainer's loss is the sum of the first)."""
    targets_BT = shift_labels(batch.labels)
    supervised_BT = targets_BT != IGNORE_INDEX
    kwargs = _forward_kwargs(batch, backend, device)
    mask_BT = supervised_BT.to(device)
    if head is not None:
        hidden_BTH = model.base_model(**kwargs).last_hidden_state
        logits_NV = head.module(hidden_BTH[mask_BT])
    else:
        logits_NV = model(**kwargs).logits[mask_BT]
    targets_N = targets_BT[supervised_BT].to(device)
    losses = []
    for start in range(0, targets_N.shape[0], LOGIT_CHUNK):
        chunk_CV = logits_NV[start : start + LOGIT_CHUNK].float()
        if head is not None and head.softcap is not None:
            chunk_CV = torch.tanh(chunk_CV / head.softcap) * head.softcap
        losses.append(F.cross_entropy(chunk_CV, targets_N[start : start + LOGIT_CHUNK], reduction="none"))
    losses_N = torch.cat(losses).double().cpu() if losses else torch.zeros(0, dtype=torch.float64)
    if source_index is None:
        return losses_N, torch.zeros(0, dtype=torch.long)
    sources_BT = torch.zeros(targets_BT.shape, dtype=torch.long)
    for row, (lengths, refs) in enumerate(zip(batch.seq_lens, batch.refs, strict=True)):
        start = 0
        for length, ref in zip(lengths, refs, strict=True):
            sources_BT[row, start : start + length] = source_index[ref.source]
            start += length
    return losses_N, sources_BT[supervised_BT]


def _progress_bar(total: int, show: bool) -> Any:
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="perplexity", unit="record", dynamic_ncols=True, leave=False)


def _advance(bar: Any, loader: Any) -> None:
    """The bar at the records this rank has read so far: samples yielded, dropped or bad."""
    if bar is None:
        return
    report = loader.report()
    read = report["samples"] + sum(report["dropped"].values()) + sum(report["bad_records"].values())
    bar.update(max(read - bar.n, 0))


# --------------------------------------------------------------------------------------------- table


def format_table(result: PerplexityResult) -> str:
    """A Markdown table: one line per source, then the total (token-weighted over the sources)."""
    lines = [
        "| source | samples | supervised tokens | loss | perplexity |",
        "|---|---:|---:|---:|---:|",
    ]

    def line(name: str, samples: float, tokens: float, loss: float, perplexity: float) -> str:
        return (
            f"| {name} | {int(samples):,} | {int(tokens):,} | {_number(loss, 4)} | {_number(perplexity, 3)} |"
        )

    for name, entry in result.sources.items():
        lines.append(line(name, entry["samples"], entry["tokens"], entry["loss"], entry["perplexity"]))
    lines.append(line("**total**", result.samples, result.tokens, result.loss, result.perplexity))
    notes = []
    if result.dropped:
        notes.append(
            f"{result.dropped:,} records gave no sample (too long for max_length, nothing supervised)"
        )
    if result.bad_records:
        notes.append(f"{result.bad_records:,} bad records skipped")
    if notes:
        lines += ["", "; ".join(notes) + "."]
    return "\n".join(lines)


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"
