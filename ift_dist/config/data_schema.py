"""The data section's schema: the data sets, the chat template (built-in, declared as data, or Jinja), labels,
truncation and packing, with the checks of their values."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from ift_dist.config.checks import ConfigError, check_choices, check_positive
from ift_dist.config.choices import (
    MultiTurnMode,
    OnBadRecord,
    Overlong,
    RecordFormat,
    SourceRole,
    Supervise,
    Template,
    ToolFallback,
)
from ift_dist.config.quality_schema import QualityConfig


@dataclass
class SourceConfig:
    """One data set: a file, a glob, a directory of files or a `datasets.save_to_disk` directory."""

    # File (.json array, .jsonl, .parquet), glob ("data/*.jsonl"), directory of such files, or a directory written
    # by `datasets.Dataset.save_to_disk`. Relative paths resolve against the working directory, not the config's.
    path: str = MISSING
    # Name used in reports, the `sources` column of prepared shards and resume state. Default: the file stem.
    name: str | None = None
    # Record format: auto (detected per file from the first valid record), alpaca, sharegpt, openai, firefly, or
    # text: raw documents {"text": ...} trained on every token, cut into max_length chunks, mixed in against
    # forgetting (docs/data.md, *Raw text against forgetting*). Never detected: a record holding only "text" could
    # as well be a broken Alpaca record, so text must be named here.
    format: RecordFormat = RecordFormat.auto
    # Mixing ratio as a repeat factor per epoch: each epoch uses weight x valid records (rounded half up) of this
    # source (2.0 = every record twice, 0.5 = a seeded random half, re-drawn each epoch).
    weight: float = 1.0
    # Field-name mapping, our name -> the file's name, for files that use other keys. Our names: instruction,
    # input, output, system, history (alpaca); conversations, from, value, tools (sharegpt); messages, role,
    # content, tool_calls (openai); conversation, human, assistant (firefly); text (text).
    columns: dict[str, str] = field(default_factory=dict)
    # Role-value mapping, the file's role value -> ours (system, user, assistant, tool, function_call),
    # added to the built-in ShareGPT/OpenAI names (human, gpt, observation, ...).
    roles: dict[str, str] = field(default_factory=dict)
    # System prompt for records of this source that have none of their own.
    system: str | None = None
    # Placeholder substitutions in every text field, e.g. {name: Ada} turns "{{name}}" into "Ada".
    placeholders: dict[str, str] = field(default_factory=dict)
    # Keep only records whose top-level fields equal these values, e.g. {label: true} for KTO-style data.
    where: dict[str, Any] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        check_choices(self, key)
        check_positive(f"{key}.weight", self.weight)
        if not self.path:
            raise ConfigError(f"{key}.path: must name a file, glob or directory")
        for file_role, role in self.roles.items():
            if role not in SourceRole.values():
                raise ConfigError(
                    f"{key}.roles.{file_role}: {role!r} is not one of {', '.join(SourceRole.values())}"
                )


@dataclass
class TemplateSpec:
    """A chat template declared as data: what surrounds each role's content. Compiled to Jinja by
    `ift_dist.data.templates`, so training and inference (the exported tokenizer) use the very same text.

    Format strings use `{content}`; `{bos_token}` / `{eos_token}` are the tokenizer's tokens."""

    # Emitted once at the start of every conversation (e.g. "{bos_token}").
    prefix: str = ""
    # Format of a system message.
    system: str = "{content}"
    # System content used when a conversation has none ("" = no system block at all). Literal text, no placeholders.
    default_system: str = ""
    # Alpaca-style templates: the default system used instead when the first user turn carries an input.
    default_system_with_input: str | None = None
    # Format of a user message.
    user: str = "{content}"
    # Alpaca-style templates: format of a user turn that carries a separate input ({instruction}, {input}).
    user_with_input: str | None = None
    # Llama-2 style: the system prompt is folded into the first user message; uses {system} and {content}.
    system_in_first_user: str | None = None
    # What precedes an assistant reply: the generation prompt at inference time. Never supervised.
    assistant_prefix: str = ""
    # Format of the reply itself (supervised), e.g. " {content}" where the reply starts with a space.
    assistant: str = "{content}"
    # The end-of-turn marker after a reply; supervised together with the reply (e.g. "{eos_token}").
    assistant_suffix: str = "{eos_token}"
    # Unsupervised text after the end-of-turn marker (e.g. "\n" between turns).
    separator: str = ""
    # Format of a tool result; also {name} (the tool's name, "" when unknown).
    tool: str = "{content}"
    # Format of one tool call inside an assistant reply ({name}, {arguments} as JSON), after the reply's text.
    tool_call: str = '<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'
    # Added to the system block when the conversation offers tools ({tools}: one JSON schema per line).
    tools: str = "You can call these functions (JSON schemas, one per line):\n{tools}"

    def validate(self, key: str) -> None:
        """Every format field is a string whose placeholders are its own (TEMPLATE_PLACEHOLDERS) or the tokenizer's."""
        for name, allowed in TEMPLATE_PLACEHOLDERS.items():
            fmt = getattr(self, name)
            if fmt is None and name in ("user_with_input", "system_in_first_user"):
                continue
            if not isinstance(fmt, str):
                raise ConfigError(f"{key}.{name}: must be a string")
            try:
                parsed = list(string.Formatter().parse(fmt))
            except ValueError as error:
                raise ConfigError(
                    f"{key}.{name}: {error} in {fmt!r} (write a literal brace as {{{{ or }}}})"
                ) from error
            for _, placeholder, format_spec, conversion in parsed:
                if placeholder is None:
                    continue
                if placeholder not in (*allowed, *TEMPLATE_TOKENS) or format_spec or conversion:
                    raise ConfigError(
                        f"{key}.{name}: unknown placeholder {{{placeholder}}} in {fmt!r}; allowed: "
                        + ", ".join("{" + option + "}" for option in (*allowed, *TEMPLATE_TOKENS))
                    )


# The tokenizer's tokens, usable in every format field of a TemplateSpec.
TEMPLATE_TOKENS = ("bos_token", "eos_token")
# The placeholders each format field of a TemplateSpec may use, besides TEMPLATE_TOKENS.
TEMPLATE_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "prefix": (),
    "system": ("content",),
    "user": ("content",),
    "user_with_input": ("instruction", "input"),
    "system_in_first_user": ("system", "content"),
    "assistant_prefix": (),
    "assistant": ("content",),
    "assistant_suffix": (),
    "separator": (),
    "tool": ("content", "name"),
    "tool_call": ("name", "arguments"),
    "tools": ("tools",),
}


@dataclass
class DataConfig:
    """Where samples come from and how they become packed token rows."""

    # Training data sets, mixed by their weights.
    sources: list[SourceConfig] = field(default_factory=list)
    # Held-out data sets for evaluation. If empty, `eval_fraction` of the training records is held out.
    eval_sources: list[SourceConfig] = field(default_factory=list)
    # Fraction of each training source held out for evaluation (by a seeded hash of source name and record
    # index, so the split is stable across runs and world sizes). Ignored when eval_sources is set.
    eval_fraction: float = 0.0
    # Fraction of each training source held out from training and from the eval split (the same seeded hash, the
    # other end of its range), written by rank 0 to <output_dir>/test_split/<source>.jsonl in the source's own row
    # format for later evaluation (docs/training.md). Not with `prepared` (its shards hold no records).
    test_fraction: float = 0.0
    # A directory written by `ift data prepare`: training streams its packed Parquet shards instead of `sources`.
    prepared: str | None = None
    # Path of the tokenizer (a local directory or hub id); defaults to the model's.
    tokenizer: str | None = None
    # "tokenizer" = the tokenizer's own chat template (training matches inference), a built-in name (alpaca,
    # alpaca_no_preamble, llama2, llama2_default_system, chatml, llama3, phi3, vicuna, stablebeluga, guanaco, firefly,
    # yayi, hermes, linly; docs/data.md), or "custom" (custom_template).
    template: Template = Template.tokenizer
    # A template declared as data, used when template == "custom".
    custom_template: TemplateSpec | None = None
    # A raw Jinja chat template that replaces the tokenizer's own (template must be "tokenizer").
    chat_template: str | None = None
    # Extra variables for the chat template, e.g. {enable_thinking: false} for reasoning templates whose generation
    # prompt otherwise opens a <think> block that the training replies lack. Pass the same ones at inference.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # System prompt of every conversation that has no system message (none in the record, no `system` of its
    # source). It is written into the run's chat template, so the sample prompts and the exported tokenizer apply it
    # too. null = the template decides: SmolLM2's, for one, injects "You are a helpful AI assistant named SmolLM,
    # trained by Hugging Face"; "" = an empty system message, which keeps such a default out (docs/data.md).
    system_prompt: str | None = None
    # Tool calls with a chat template that does not render them (SmolLM2's, Phi-3's render `content` only):
    # "text" writes each call into the reply as the JSON object {"name": ..., "arguments": ...} and the tool schemas
    # into the system prompt (or the first user message when the template ignores system messages), so tool data
    # still trains; "drop" drops such samples (reason template_drops_tool_calls). Inference must use the same text.
    tool_fallback: ToolFallback = ToolFallback.text
    # Which tokens carry loss: "assistant" = every assistant turn, "last_assistant" = the final one only,
    # "all" = prompts too. End-of-turn markers of supervised turns are always supervised.
    supervise: Supervise = Supervise.assistant
    # How a multi-turn conversation becomes samples (supervise "assistant" only; docs/data.md, *Multi-turn modes*):
    # "whole" = one sample per conversation; a template that renders an earlier turn differently once later turns
    # follow (Qwen3 strips old <think> blocks) cannot be masked, so such a record is dropped as
    # template_not_prefix_stable. "per_turn" = one sample per assistant turn k: the messages up to turn k rendered as
    # the template renders them when turn k is generated, only turn k (reply + end-of-turn marker) supervised; the
    # history is re-read once per turn. "auto" = whole, and per_turn for each record whole cannot mask (counted as
    # per_turn_conversations / per_turn_samples in the data report).
    multi_turn_mode: MultiTurnMode = MultiTurnMode.auto
    # Maximum tokens of one sample and of one packed row.
    max_length: int = 2048
    # A sample whose first exchange alone exceeds max_length: "drop" it or "truncate" it (cut at max_length,
    # no end-of-turn marker added). Longer conversations always lose whole trailing turns first.
    overlong: Overlong = Overlong.drop
    # Pack several samples into one row (best-fit decreasing); False = one padded sample per row.
    packing: bool = True
    # Samples held by the streaming packer; bigger = fuller rows, more memory. Must be >= 1.
    pack_buffer: int = 2000
    # Pad every batch to max_length tokens (static shapes) instead of to its longest row.
    pad_to_max_length: bool = False
    # A record that cannot be turned into a conversation: "skip" it (counted and reported by reason) or stop
    # with an "error" before training starts. A file that cannot be read at all is always an error.
    on_bad_record: OnBadRecord = OnBadRecord.skip
    # Shuffle record order each epoch (seeded by `seed` and the epoch number).
    shuffle: bool = True
    # DataLoader worker processes per rank that read and render samples (0 = in the main process).
    num_workers: int = 1
    # Seed of shuffling, mixing and eval split.
    seed: int = 0
    # Duplicates, benchmark contamination, quality filters and balancing between records and rendering
    # (quality_schema.py, docs/data_quality.md). All off by default.
    quality: QualityConfig = field(default_factory=QualityConfig)

    def validate(self, key: str) -> None:
        check_choices(self, key)
        for index, source in enumerate(self.sources):
            source.validate(f"{key}.sources[{index}]")
        for index, source in enumerate(self.eval_sources):
            source.validate(f"{key}.eval_sources[{index}]")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"{key}.eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.test_fraction < 1.0 or self.eval_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"{key}.test_fraction: must be in [0, 1) and leave records to train on with {key}.eval_fraction "
                f"({self.eval_fraction:g} + {self.test_fraction:g} must be < 1)"
            )
        if self.test_fraction > 0 and self.prepared:
            raise ConfigError(
                f"{key}.test_fraction: not with {key}.prepared (prepared shards hold packed rows, not the records a "
                "test split is written from); train from data.sources"
            )
        if self.template == Template.custom and self.custom_template is None:
            raise ConfigError(f"{key}.custom_template: required when {key}.template is 'custom'")
        if self.chat_template is not None and self.template != Template.tokenizer:
            raise ConfigError(
                f"{key}.chat_template: only with {key}.template 'tokenizer', got '{self.template}'"
            )
        if self.template == Template.custom:
            self.custom_template.validate(f"{key}.custom_template")
        if self.max_length < 8:
            raise ConfigError(f"{key}.max_length: must be >= 8, got {self.max_length}")
        if self.pack_buffer < 1:
            raise ConfigError(f"{key}.pack_buffer: must be >= 1, got {self.pack_buffer}")
        if self.multi_turn_mode == MultiTurnMode.per_turn and self.supervise != Supervise.assistant:
            # last_assistant already has one supervised turn per sample; "all" would train the history once per turn.
            raise ConfigError(
                f"{key}.multi_turn_mode: per_turn needs {key}.supervise 'assistant', got '{self.supervise}'"
            )
        check_positive(f"{key}.num_workers", self.num_workers, allow_zero=True)
        self.quality.validate(f"{key}.quality")
