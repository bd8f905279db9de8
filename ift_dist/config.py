"""The typed run configuration: dataclass schema, loading (YAML + CLI dotlist) through OmegaConf, validation, save.

This is the only module that imports omegaconf. Components receive their own sub-dataclass, never a DictConfig.
Every error names the dotted key it is about, e.g. ``data.sources[1].weight``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message starts with the dotted key."""


def _check_choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(options)}")


def _check_positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


# --------------------------------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    """One data set: a file, a glob, a directory of files or a `datasets.save_to_disk` directory."""

    # File (.json array, .jsonl, .parquet), glob ("data/*.jsonl"), directory of such files, or a directory written
    # by `datasets.Dataset.save_to_disk`. Relative paths are relative to the working directory.
    path: str = MISSING
    # Name used in reports, the `sources` column of prepared shards and resume state. Default: the file stem.
    name: str | None = None
    # Record format: auto (detected per file from the first valid record), alpaca, sharegpt, openai, firefly.
    format: str = "auto"
    # Mixing ratio as a repeat factor per epoch: each epoch uses weight x valid records (rounded half up) of this
    # source (2.0 = every record twice, 0.5 = a seeded random half, re-drawn each epoch).
    weight: float = 1.0
    # Field-name mapping, our name -> the file's name, for files that use other keys. Our names: instruction,
    # input, output, system, history (alpaca); conversations, from, value, tools (sharegpt); messages, role,
    # content, tool_calls (openai); conversation, human, assistant (firefly).
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
        _check_choice(f"{key}.format", self.format, ("auto", "alpaca", "sharegpt", "openai", "firefly"))
        _check_positive(f"{key}.weight", self.weight)
        if not self.path:
            raise ConfigError(f"{key}.path: must name a file, glob or directory")
        for file_role, role in self.roles.items():
            _check_choice(
                f"{key}.roles.{file_role}", role, ("system", "user", "assistant", "tool", "function_call")
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
    # A directory written by `ift data prepare`: training streams its packed Parquet shards instead of `sources`.
    prepared: str | None = None
    # Path of the tokenizer (a local directory or hub id); defaults to the model's.
    tokenizer: str | None = None
    # "tokenizer" = the tokenizer's own chat template (training matches inference), a built-in name
    # (alpaca, llama2, chatml, llama3, phi3, vicuna, stablebeluga, guanaco), or "custom" (custom_template).
    template: str = "tokenizer"
    # A template declared as data, used when template == "custom".
    custom_template: TemplateSpec | None = None
    # A raw Jinja chat template that replaces the tokenizer's own (template must be "tokenizer").
    chat_template: str | None = None
    # Extra variables for the chat template, e.g. {enable_thinking: false} for reasoning templates whose generation
    # prompt otherwise opens a <think> block that the training replies lack. Pass the same ones at inference.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # Which tokens carry loss: "assistant" = every assistant turn, "last_assistant" = the final one only,
    # "all" = prompts too. End-of-turn markers of supervised turns are always supervised.
    supervise: str = "assistant"
    # Maximum tokens of one sample and of one packed row.
    max_length: int = 2048
    # A sample whose first exchange alone exceeds max_length: "drop" it or "truncate" it (cut at max_length,
    # no end-of-turn marker added). Longer conversations always lose whole trailing turns first.
    overlong: str = "drop"
    # Pack several samples into one row (best-fit decreasing); False = one padded sample per row.
    packing: bool = True
    # Samples held by the streaming packer; bigger = fuller rows, more memory. Must be >= 1.
    pack_buffer: int = 2000
    # Pad every batch to max_length tokens (static shapes) instead of to its longest row.
    pad_to_max_length: bool = False
    # A record that cannot be turned into a conversation: "skip" it (counted and reported by reason) or stop
    # with an "error" before training starts. A file that cannot be read at all is always an error.
    on_bad_record: str = "skip"
    # Shuffle record order each epoch (seeded by `seed` and the epoch number).
    shuffle: bool = True
    # DataLoader worker processes per rank that read and render samples (0 = in the main process).
    num_workers: int = 1
    # Seed of shuffling, mixing and eval split.
    seed: int = 0

    def validate(self, key: str) -> None:
        for index, source in enumerate(self.sources):
            source.validate(f"{key}.sources[{index}]")
        for index, source in enumerate(self.eval_sources):
            source.validate(f"{key}.eval_sources[{index}]")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"{key}.eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if self.template == "custom" and self.custom_template is None:
            raise ConfigError(f"{key}.custom_template: required when {key}.template is 'custom'")
        if self.chat_template is not None and self.template != "tokenizer":
            raise ConfigError(f"{key}.chat_template: only with {key}.template 'tokenizer', got {self.template!r}")
        _check_choice(f"{key}.supervise", self.supervise, ("assistant", "last_assistant", "all"))
        _check_choice(f"{key}.overlong", self.overlong, ("drop", "truncate"))
        _check_choice(f"{key}.on_bad_record", self.on_bad_record, ("skip", "error"))
        if self.max_length < 8:
            raise ConfigError(f"{key}.max_length: must be >= 8, got {self.max_length}")
        if self.pack_buffer < 1:
            raise ConfigError(f"{key}.pack_buffer: must be >= 1, got {self.pack_buffer}")
        _check_positive(f"{key}.num_workers", self.num_workers, allow_zero=True)


# --------------------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """The pretrained causal LM to fine-tune."""

    # Local directory or hub id of an AutoModelForCausalLM.
    name_or_path: str = ""
    # A GGUF file inside name_or_path to load (dequantized) instead of safetensors.
    gguf_file: str | None = None
    # Allow the model's own Python code from its repository. Off unless the user sets it.
    trust_remote_code: bool = False
    # Weight dtype: "auto" = bfloat16 on GPUs, float32 on CPU; or bfloat16, float16, float32.
    dtype: str = "auto"
    # Attention kernel for packed rows: "auto" (flash_attn if installed, else torch_varlen, else flex on CUDA;
    # sdpa on CPU), flash_attn, torch_varlen, flex, sdpa, eager. See ift_dist/attention.py.
    attention: str = "auto"
    # Recompute each decoder layer's activations in the backward pass: less memory, ~30% more compute.
    gradient_checkpointing: bool = False

    def validate(self, key: str) -> None:
        _check_choice(f"{key}.dtype", self.dtype, ("auto", "bfloat16", "float16", "float32"))
        backends = ("auto", "flash_attn", "torch_varlen", "flex", "sdpa", "eager")
        _check_choice(f"{key}.attention", self.attention, backends)


# --------------------------------------------------------------------------------------------------- run


@dataclass
class Config:
    """A whole run."""

    # Where the run writes everything: config.yaml, metrics.jsonl, checkpoints, exports.
    output_dir: str = "runs/default"
    # Global seed; data.seed defaults to it when left at 0.
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        self.model.validate("model")
        self.data.validate("data")


def _format_omegaconf_error(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    message = getattr(error, "msg", None) or str(error).splitlines()[0]
    return f"{key}: {message}" if key else message


def _apply_override(merged: Any, item: str) -> None:
    """One ``key=value`` from the command line. Keys may index lists: ``data.sources.0.weight=2`` or
    ``data.sources[0].weight=2``. The value is parsed as YAML (``true``, ``3``, ``[a, b]``, ``{k: v}``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value")
    key = re.sub(r"\[(\d+)\]", r".\1", key.strip())
    value = OmegaConf.create({"value": yaml.safe_load(raw) if raw.strip() else ""})["value"]
    if OmegaConf.select(merged, key, default=_ABSENT) is _ABSENT:
        raise ConfigError(f"{key}: unknown key (from the command line override {item!r})")
    OmegaConf.update(merged, key, value, merge=True)


_ABSENT = object()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, schema: type = Config) -> Any:
    """YAML file (optional) + CLI dotlist overrides (``data.max_length=4096``) -> validated dataclass."""
    try:
        merged = OmegaConf.structured(schema)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for item in overrides or []:
            _apply_override(merged, item)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(_format_omegaconf_error(error) + where) from error
    config.validate()
    return config


def to_yaml(config: Any) -> str:
    """The resolved config as YAML, as saved into the run directory and sent to W&B."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(to_yaml(config))
