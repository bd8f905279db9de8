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

# The checkpoint and export sections live in their own module (this one stays small); they validate with ours.
from ift_dist.config_checkpoint import CheckpointConfig, ExportConfig


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
    # by `datasets.Dataset.save_to_disk`. Relative paths resolve against the working directory, not the config's.
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
    # System prompt of every conversation that has no system message (none in the record, no `system` of its
    # source). It is written into the run's chat template, so the sample prompts and the exported tokenizer apply it
    # too. null = the template decides: SmolLM2's, for one, injects "You are a helpful AI assistant named SmolLM,
    # trained by Hugging Face"; "" = an empty system message, which keeps such a default out (docs/data.md).
    system_prompt: str | None = None
    # Tool calls with a chat template that does not render them (SmolLM2's, Phi-3's render `content` only):
    # "text" writes each call into the reply as the JSON object {"name": ..., "arguments": ...} and the tool schemas
    # into the system prompt (or the first user message when the template ignores system messages), so tool data
    # still trains; "drop" drops such samples (reason template_drops_tool_calls). Inference must use the same text.
    tool_fallback: str = "text"
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
            raise ConfigError(
                f"{key}.chat_template: only with {key}.template 'tokenizer', got {self.template!r}"
            )
        # Imported here: templates.py imports this module (TemplateSpec). Compiling a custom template now reports
        # a bad placeholder at load time, naming its field.
        from ift_dist.data.templates import BUILTIN_TEMPLATES, compile_template

        _check_choice(f"{key}.template", self.template, ("tokenizer", "custom", *BUILTIN_TEMPLATES))
        if self.template == "custom":
            compile_template(self.custom_template, f"{key}.custom_template")
        _check_choice(f"{key}.supervise", self.supervise, ("assistant", "last_assistant", "all"))
        _check_choice(f"{key}.tool_fallback", self.tool_fallback, ("text", "drop"))
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


# --------------------------------------------------------------------------------------------------- train


@dataclass
class TrainConfig:
    """The optimisation: batch geometry, AdamW, LR schedule, loss path, NaN policy, eval and sample cadence.

    Batch arithmetic (docs/training.md): a row is one packed row of at most data.max_length tokens. One optimizer
    step consumes global_batch_rows rows = micro_batch_rows x world size x accumulation steps."""

    # Optimizer steps to run; one step = one global batch. Skipped (non-finite) steps count too.
    max_steps: int = 1000
    # Packed rows per optimizer step, summed over all ranks. Set this or global_batch_tokens (not both; neither =
    # micro_batch_rows x world size, no accumulation). Must be a multiple of micro_batch_rows x world size; the
    # quotient is the number of gradient accumulation steps.
    global_batch_rows: int | None = None
    # The global batch in tokens of row capacity: global_batch_rows = global_batch_tokens / data.max_length (must
    # divide). Real tokens per step are fewer by the packing efficiency (logged each step).
    global_batch_tokens: int | None = None
    # Rows per rank in one forward/backward pass (the micro batch).
    micro_batch_rows: int = 1
    # Rows per rank in one evaluation forward pass; null = micro_batch_rows.
    eval_batch_rows: int | None = None
    # Peak learning rate of AdamW.
    learning_rate: float = 2e-5
    # After warmup: "cosine" or "linear" decay to min_lr_ratio x learning_rate at max_steps, or "constant".
    lr_schedule: str = "cosine"
    # Steps of linear warmup: step s < warmup_steps uses learning_rate x (s + 1) / warmup_steps.
    warmup_steps: int = 0
    # Final learning rate of the cosine/linear decay, as a fraction of learning_rate (0.1 = 10%).
    min_lr_ratio: float = 0.0
    # AdamW decoupled weight decay of matrices; parameters of fewer than 2 dimensions (norms, biases) get none.
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    # Clip the global gradient 2-norm to this before the update (0 = no clipping).
    max_grad_norm: float = 1.0
    # "fused": hidden states -> fused linear cross-entropy (ift_dist.kernels), never holding the full-vocabulary
    # logits; "reference": the model's own logits -> torch cross-entropy (the executable specification).
    loss: str = "fused"
    # Evaluate every N optimizer steps (0 = only at the end). Needs data.eval_sources or data.eval_fraction; without
    # either there is no evaluation.
    eval_every: int = 0
    # Non-finite (NaN/inf) loss or gradient norm: the step is skipped; this many skipped steps in a row stop the run
    # with exit code 3.
    max_bad_steps: int = 5
    # DeepSpeed JSON holding ZeRO knobs only (configs/ds_zero3/); null = plain ZeRO stage 3. Batch sizes, clipping,
    # precision, optimizer and schedule come from this config; a JSON that sets them is rejected.
    zero_config: str | None = None
    # Save a checkpoint into <output_dir>/checkpoints/step_<N> when training ends (docs/checkpoints.md); the
    # periodic and on-signal saves are set in the `checkpoint` section.
    save_at_end: bool = True
    # Prompts (user messages) answered greedily before and after training, through the run's chat template; printed
    # on rank 0 and written to <output_dir>/samples.jsonl.
    sample_prompts: list[str] = field(default_factory=list)
    # Most new tokens of each sample answer.
    sample_max_new_tokens: int = 64

    def validate(self, key: str) -> None:
        _check_positive(f"{key}.max_steps", self.max_steps)
        if self.global_batch_rows is not None and self.global_batch_tokens is not None:
            raise ConfigError(f"{key}.global_batch_rows: set it or {key}.global_batch_tokens, not both")
        for name in ("global_batch_rows", "global_batch_tokens", "eval_batch_rows"):
            if getattr(self, name) is not None:
                _check_positive(f"{key}.{name}", getattr(self, name))
        _check_positive(f"{key}.micro_batch_rows", self.micro_batch_rows)
        _check_positive(f"{key}.learning_rate", self.learning_rate)
        _check_choice(f"{key}.lr_schedule", self.lr_schedule, ("cosine", "linear", "constant"))
        _check_positive(f"{key}.warmup_steps", self.warmup_steps, allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{key}.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        _check_positive(f"{key}.weight_decay", self.weight_decay, allow_zero=True)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{key}.{name}: must be in [0, 1), got {getattr(self, name)}")
        _check_positive(f"{key}.adam_epsilon", self.adam_epsilon)
        _check_positive(f"{key}.max_grad_norm", self.max_grad_norm, allow_zero=True)
        _check_choice(f"{key}.loss", self.loss, ("fused", "reference"))
        _check_positive(f"{key}.eval_every", self.eval_every, allow_zero=True)
        _check_positive(f"{key}.max_bad_steps", self.max_bad_steps)
        _check_positive(f"{key}.sample_max_new_tokens", self.sample_max_new_tokens)


@dataclass
class WandbConfig:
    """Weights & Biases tracking (rank 0 only). The run id is kept in <output_dir>/wandb_run_id, so a run restarted
    in the same output_dir continues the same W&B run."""

    # "online", "offline" (written under <output_dir>/wandb/, sync later with `wandb sync`) or "disabled".
    mode: str = "disabled"
    project: str = "ift-dist"
    # Team or user; null = the logged-in user's default.
    entity: str | None = None
    # Display name; null = the name of output_dir.
    name: str | None = None
    tags: list[str] = field(default_factory=list)

    def validate(self, key: str) -> None:
        _check_choice(f"{key}.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class TrackingConfig:
    """Where metrics go besides <output_dir>/metrics.jsonl (always written)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Peak dense TFLOP/s of one GPU in the training dtype, for MFU; 0 = look the GPU up by name (H100, A100, ...).
    peak_tflops: float = 0.0

    def validate(self, key: str) -> None:
        self.wandb.validate(f"{key}.wandb")
        _check_positive(f"{key}.peak_tflops", self.peak_tflops, allow_zero=True)


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
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> None:
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.tracking.validate("tracking")
        self.checkpoint.validate("checkpoint")
        self.export.validate("export")
        tokens = self.train.global_batch_tokens
        if tokens is not None and tokens % self.data.max_length:
            raise ConfigError(
                f"train.global_batch_tokens: {tokens} is not a multiple of data.max_length "
                f"({self.data.max_length}); one row holds data.max_length tokens"
            )


def _format_omegaconf_error(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    message = (getattr(error, "msg", None) or str(error)).splitlines()[0]  # one line; OmegaConf adds details
    return f"{key}: {message}" if key else message


def _apply_override(merged: Any, item: str, schema: type) -> None:
    """One ``key=value`` from the command line. Keys may index lists: ``data.sources.0.weight=2`` or
    ``data.sources[0].weight=2``. The value is parsed as YAML (``true``, ``3``, ``[a, b]``, ``{k: v}``)."""
    from ift_dist.config_check import schema_key  # imports this module

    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value")
    key = re.sub(r"\[(\d+)\]", r".\1", key.strip())
    shown = schema_key(key.split("."), schema, where=f" (from the command line override {item!r})")
    value = OmegaConf.create({"value": yaml.safe_load(raw) if raw.strip() else ""})["value"]
    if OmegaConf.select(merged, key, default=_ABSENT) is _ABSENT:
        raise ConfigError(f"{shown}: not in the config (from the command line override {item!r})")
    OmegaConf.update(merged, key, value, merge=True)


_ABSENT = object()


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, schema: type = Config
) -> Any:
    """YAML file (optional) + CLI dotlist overrides (``data.max_length=4096``) -> validated dataclass."""
    from ift_dist.config_check import check_keys  # imports this module

    try:
        merged = OmegaConf.structured(schema)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            document = OmegaConf.load(path)
            check_keys(OmegaConf.to_container(document), schema, where=f" (in {path})")
            merged = OmegaConf.merge(merged, document)
        for item in overrides or []:
            _apply_override(merged, item, schema)
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
