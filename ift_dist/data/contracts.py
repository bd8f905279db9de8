"""The small typed records that the data stages hand to each other (records -> render -> pack -> loader).

    file row (dict) --records--> Conversation --render--> RenderedSample --pack--> PackedRow --loader--> PackedBatch

A `format: text` row takes the same path as a TextDocument, rendered to TextSamples (ift_dist/data/text_source.py).

Labels follow the Hugging Face convention: aligned with input_ids, the model at position t predicts labels[t + 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The label of a token that carries no loss. Defined here once; everything else imports it.
IGNORE_INDEX = -100

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, order=True)
class SampleRef:
    """Which record a sample came from: the source's name and the record's index in that source.

    The index counts records as the file holds them (line order for JSONL, element order for a JSON array,
    row order for Parquet/Arrow), 0-based, bad records included, so it names the same record in every report."""

    source: str
    index: int

    def __str__(self) -> str:
        return f"{self.source}:{self.index}"

    @classmethod
    def parse(cls, text: str) -> SampleRef:
        source, _, index = text.rpartition(":")
        return cls(source, int(index))


@dataclass
class Message:
    """One turn of a conversation, in OpenAI's vocabulary."""

    role: str  # one of ROLES
    content: str
    # OpenAI form: [{"type": "function", "function": {"name": str, "arguments": dict | str}}]
    tool_calls: list[dict[str, Any]] | None = None
    # Tool name of a tool result, when the record gives it.
    name: str | None = None
    # Alpaca records only: (instruction, input) kept apart, for templates that place them separately (the
    # Stanford "with input" prompt). `content` holds them joined, for every other template.
    alpaca: tuple[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The dict a Jinja chat template sees."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls is not None:
            out["tool_calls"] = self.tool_calls
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass
class Conversation:
    """A validated conversation: at least one non-empty assistant turn, roles in a legal order."""

    messages: list[Message]
    ref: SampleRef
    # Tool (function) schemas offered to the model, OpenAI form: [{"type": "function", "function": {...}}].
    tools: list[dict[str, Any]] | None = None
    # The record's own `category` field (Firefly, Dolly, Self-Instruct style), for quality reports and balancing.
    category: str | None = None


@dataclass
class TextDocument:
    """A plain document of a `format: text` source: no roles, no template; every token of it is trained."""

    text: str  # never empty or whitespace-only
    ref: SampleRef


# What a valid record becomes: a conversation, or a plain document of a `format: text` source.
ValidRecord = Conversation | TextDocument


@dataclass(frozen=True)
class BadRecord:
    """Why one record was rejected, precisely enough to find and fix it."""

    reason: str  # short key used for counting: invalid_json, wrong_type, unknown_role, no_assistant, ...
    file: str
    location: str  # "line 12" (JSONL), "record 5" (JSON array), "row 7" (Parquet/Arrow)
    field: str | None  # dotted path inside the record, e.g. "conversations[3].from"
    detail: str

    def __str__(self) -> str:
        where = f"{self.file}, {self.location}"
        if self.field:
            where += f", field {self.field}"
        return f"{where}: {self.detail} [{self.reason}]"


class BadRecordError(ValueError):
    """Raised for a bad record when data.on_bad_record is "error"."""

    def __init__(self, bad: BadRecord):
        super().__init__(str(bad))
        self.bad = bad


class DataFileError(ValueError):
    """A data file cannot be read at all (missing, unreadable, not JSON/Parquet); always fatal, before training."""


@dataclass
class RenderedSample:
    """One conversation as tokens, with assistant-only labels (IGNORE_INDEX elsewhere)."""

    input_ids: list[int]
    labels: list[int]
    ref: SampleRef
    # Whole trailing turns removed to fit max_length (0 = none).
    dropped_turns: int = 0
    # Cut at max_length inside the first exchange (only with data.overlong = "truncate").
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Dropped:
    """A valid conversation that produced no sample (too long, or a template that cannot be masked)."""

    ref: SampleRef
    reason: str  # too_long, template_error, template_not_prefix_stable, nothing_supervised, ...
    detail: str = ""


@dataclass
class TurnSamples:
    """One conversation rendered as one sample per assistant turn (data.multi_turn_mode), in turn order: each sample
    supervises its own turn only and is packed as an independent sample. `dropped`: the turns that gave none."""

    samples: list[RenderedSample]
    dropped: list[Dropped] = field(default_factory=list)


@dataclass
class TextSamples:
    """One TextDocument as tokens, cut into consecutive chunks of at most max_length tokens, in order; each chunk is
    an independent sample (no attention across chunks, so a chunk's first token is not predicted)."""

    samples: list[RenderedSample]
    # Tokens of a final one-token chunk: it has no target, so it gives no sample (0 or 1).
    unsupervised_tail: int = 0


@dataclass
class PackedRow:
    """Several samples laid end to end in one row of at most max_length tokens.

    position_ids restart at 0 for every sample; seq_lens gives each sample's length in order (their sum is the
    row's length; padding, if any, is added later by the loader and is not a sample); the first label of every
    sample is IGNORE_INDEX, so no token is trained to predict across a boundary."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_lens: list[int]
    refs: list[SampleRef] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PackedBatch:
    """One micro batch of rows for one rank, as tensors: [rows, T] with T = the longest row (or max_length).

    Padding sits at the end of a row: input_ids = pad id, labels = IGNORE_INDEX, position_ids = 0, and it is
    not listed in seq_lens, so attention builders treat it as its own segment that nothing attends to."""

    input_ids: Any  # torch.LongTensor [B, T]
    labels: Any  # torch.LongTensor [B, T]
    position_ids: Any  # torch.LongTensor [B, T]
    seq_lens: list[list[int]]  # per row, the sample lengths in order
    refs: list[list[SampleRef]]  # per row, where each sample came from

    @classmethod
    def idle(cls, pad_id: int) -> PackedBatch:
        """One pad token and no label: a forward pass that trains and scores nothing, for synced ranks whose share
        of an evaluation is done while others still run forwards (under ZeRO-3 each forward gathers from all)."""
        import torch

        ids_11 = torch.full((1, 1), int(pad_id), dtype=torch.long)
        return cls(ids_11, torch.full_like(ids_11, IGNORE_INDEX), torch.zeros_like(ids_11), [[1]], [[]])

    @property
    def num_loss_tokens(self) -> int:
        """Supervised targets in this batch. Equal to (labels[:, 1:] != IGNORE_INDEX).sum() because the first
        label of every row and every packed sample is IGNORE_INDEX."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return sum(sum(lens) for lens in self.seq_lens)

    def cu_seqlens(self) -> Any:
        """Cumulative sample boundaries over the flattened [B * T] batch, int32, as flash-attn's varlen kernels
        take them. Each row's padding tail counts as one extra segment so offsets stay aligned with rows."""
        import torch

        total = self.input_ids.shape[1]
        bounds = [0]
        for lens in self.seq_lens:
            start = bounds[-1]
            for length in lens:
                bounds.append(bounds[-1] + length)
            if bounds[-1] - start < total:
                bounds.append(start + total)
        return torch.tensor(bounds, dtype=torch.int32)
