"""Renders a plain-text document (a `format: text` source) as consecutive max_length chunks supervised on every token.

A document is what the tokenizer makes of its text without a chat template (with the BOS token where the tokenizer
adds one itself, e.g. Llama's), then the EOS token, so the model learns where a document ends, as in pretraining.
Every token is a target, except the first of each chunk: labels follow the RenderedSample contract (aligned with
input_ids; the packer makes every sample's first label IGNORE_INDEX). A document longer than data.max_length is cut
into consecutive chunks of max_length tokens, without overlap; each chunk is its own sample, packed and masked like a
chat sample, so attention never crosses from one chunk into the next: the first token of a later chunk is context
only. A final chunk of a single token (no target) gives no sample and is counted as `unsupervised_tail`.
"""

from __future__ import annotations

from typing import Any

from ift_dist.config import ConfigError, DataConfig, RecordFormat
from ift_dist.data.contracts import IGNORE_INDEX, RenderedSample, TextDocument, TextSamples


def only_text(cfg: DataConfig) -> bool:
    """Whether every configured source (training and eval) is `format: text`: then no conversation is ever rendered
    and the tokenizer needs no chat template."""
    sources = [*cfg.sources, *cfg.eval_sources]
    return bool(sources) and all(source.format == RecordFormat.text for source in sources)


def has_text(cfg: DataConfig) -> bool:
    """Whether any configured source is `format: text`."""
    return any(source.format == RecordFormat.text for source in [*cfg.sources, *cfg.eval_sources])


def end_of_document_id(tokenizer: Any) -> int:
    """The token that closes every document: the tokenizer's EOS (a ConfigError when it has none)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(
            f"data.sources: format text needs an end-of-sequence token to close each document; tokenizer "
            f"{name!r} has none"
        )
    return int(eos)


def render_document(document: TextDocument, tokenizer: Any, max_length: int) -> TextSamples:
    """The document's tokens, EOS appended, cut into chunks of at most `max_length` tokens, each fully supervised."""
    eos = end_of_document_id(tokenizer)
    # verbose=False: a document longer than the model's context is expected here; it is cut below.
    ids = list(tokenizer(document.text, add_special_tokens=True, verbose=False)["input_ids"])
    if not ids or ids[-1] != eos:  # a tokenizer that appends EOS itself (T5-style) keeps its one
        ids.append(eos)
    result = TextSamples(samples=[])
    for start in range(0, len(ids), max_length):
        chunk = ids[start : start + max_length]
        if len(chunk) < 2:
            result.unsupervised_tail = len(chunk)
            continue
        labels = [IGNORE_INDEX, *chunk[1:]]
        result.samples.append(RenderedSample(input_ids=chunk, labels=labels, ref=document.ref))
    return result
