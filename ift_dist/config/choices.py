"""Every closed set of values a config key can take, one str-Enum per set, imported wherever the set is needed.

A member's name is its value (`DType.float32 == "float32"`), so the YAML, the CLI and the saved config.yaml hold plain
strings, OmegaConf converts them by name, and a member compares, hashes and formats as its string.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A str-Enum that behaves as its value everywhere: equality, hashing (dict keys), str() and f-strings."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, format_spec: str) -> str:
        return format(self.value, format_spec)

    def __hash__(self) -> int:
        return hash(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class DType(Choice):
    """Weight dtype of training (model.dtype) and of an export (export.dtype, `ift export --dtype`); auto: see each."""

    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class AttentionBackend(Choice):
    """Attention kernel for packed rows (model.attention); auto picks the fastest that runs (ift_dist/attention.py)."""

    auto = "auto"
    flash_attn = "flash_attn"
    torch_varlen = "torch_varlen"
    flex = "flex"
    sdpa = "sdpa"
    eager = "eager"


class LossMode(Choice):
    """train.loss: fused linear cross-entropy (ift_dist.kernels) or the model's logits + torch cross-entropy."""

    fused = "fused"
    reference = "reference"


class WeightGradPass(Choice):
    """train.fused_loss_dw: the dW strategy of the fused loss (ift_dist/kernels/options.py, ChunkPlan)."""

    auto = "auto"
    vocab = "vocab"
    rows = "rows"
    rows_inplace = "rows_inplace"


class ZeroSingleRank(Choice):
    """train.zero_single_rank: what ZeRO-3 does on one rank (ift_dist/engine.py, single_rank_persistence)."""

    persist = "persist"  # every parameter stays gathered: no per-layer gather/release; the same checkpoints
    zero3 = "zero3"  # DeepSpeed's ZeRO-3 defaults, as on many ranks


class LrSchedule(Choice):
    """train.lr_schedule: the decay after warmup."""

    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class MetricMode(Choice):
    """train.early_stopping.mode: whether a lower or a higher value of the watched metric is better; auto = lower for a
    loss or perplexity, higher for an accuracy."""

    auto = "auto"
    min = "min"
    max = "max"


class RecordFormat(Choice):
    """data.sources[].format: how a file's rows are read; auto detects it per file."""

    auto = "auto"
    alpaca = "alpaca"
    sharegpt = "sharegpt"
    openai = "openai"
    firefly = "firefly"
    # Plain documents ({"text": ...}) trained on every token, never detected: named explicitly (data.md).
    text = "text"


class SourceRole(Choice):
    """The roles a file's role value may be mapped to (data.sources[].roles)."""

    system = "system"
    user = "user"
    assistant = "assistant"
    tool = "tool"
    function_call = "function_call"


class Template(Choice):
    """data.template: the tokenizer's own chat template, a custom TemplateSpec, or a built-in one
    (ift_dist.data.builtin_templates.BUILTIN_TEMPLATES holds a spec for every other member)."""

    tokenizer = "tokenizer"
    custom = "custom"
    alpaca = "alpaca"
    alpaca_no_preamble = "alpaca_no_preamble"
    llama2 = "llama2"
    llama2_default_system = "llama2_default_system"
    chatml = "chatml"
    llama3 = "llama3"
    phi3 = "phi3"
    vicuna = "vicuna"
    stablebeluga = "stablebeluga"
    guanaco = "guanaco"
    firefly = "firefly"
    yayi = "yayi"
    hermes = "hermes"
    linly = "linly"


class Supervise(Choice):
    """data.supervise: which tokens carry loss."""

    assistant = "assistant"
    last_assistant = "last_assistant"
    all = "all"


class MultiTurnMode(Choice):
    """data.multi_turn_mode: a multi-turn conversation as one sample, or as one sample per assistant turn."""

    auto = "auto"
    whole = "whole"
    per_turn = "per_turn"


class ToolFallback(Choice):
    """data.tool_fallback: tool calls with a chat template that does not render them."""

    text = "text"
    drop = "drop"


class Overlong(Choice):
    """data.overlong: a sample whose first exchange alone exceeds data.max_length."""

    drop = "drop"
    truncate = "truncate"


class OnBadRecord(Choice):
    """data.on_bad_record: a record that cannot be turned into a conversation."""

    skip = "skip"
    error = "error"


class WandbMode(Choice):
    """tracking.wandb.mode."""

    online = "online"
    offline = "offline"
    disabled = "disabled"


# "continue" is a keyword, so this set is declared with the functional API (the member name must be the value).
OnSaveError = Choice(
    "OnSaveError", {"stop": "stop", "continue": "continue"}, module=__name__, qualname="OnSaveError"
)
OnSaveError.__doc__ = (
    "checkpoint.on_save_error: a save that fails on any rank stops the run or training continues."
)


class McScoring(Choice):
    """How a multiple-choice answer is scored (`ift eval mc --scoring`, eval.benchmarks[].scoring); docs/eval.md.

    letter: log-likelihood of " A".." D" after "Answer:" (original MMLU, lm-evaluation-harness `mmlu`).
    option_text: log-likelihood of each option's text (lm-eval `mmlu_continuation`), with length-normalised accuracy.
    """

    letter = "letter"
    option_text = "option_text"


class PromptFormat(Choice):
    """How a multiple-choice prompt is written: plain text (lm-evaluation-harness's prompt) or a multi-turn chat
    through the model's own chat template (each few-shot example a user turn and an assistant answer)."""

    plain = "plain"
    chat = "chat"
