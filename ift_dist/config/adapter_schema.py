"""model.adapter and model.quantization: parameter-efficient fine-tuning (LoRA through peft, QLoRA's 4-bit base through
bitsandbytes) on the same pipeline as full-parameter training. docs/lora.md explains when to use which."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ift_dist.config.checks import ConfigError, check_choices, check_positive
from ift_dist.config.choices import Choice, DType

# peft's shorthand for every linear layer but the output head.
ALL_LINEAR = "all-linear"


class AdapterType(Choice):
    """model.adapter.type: none = full-parameter training; lora = LoRA (with use_dora: DoRA) through peft."""

    none = "none"
    lora = "lora"


class LoraInit(Choice):
    """model.adapter.init: how the adapter starts. default = peft's (A Kaiming-uniform, B zero: the adapted model
    starts equal to the base); gaussian = A normal with std 1/r, B zero (also equal to the base at step 0)."""

    default = "default"
    gaussian = "gaussian"


class QuantType(Choice):
    """model.quantization.type: the 4-bit data type of bitsandbytes (QLoRA uses nf4)."""

    nf4 = "nf4"
    fp4 = "fp4"


@dataclass
class AdapterConfig:
    """The adapter trained instead of the whole model (model.adapter). With type: lora the base model is frozen:
    only the adapter (and modules_to_save) get gradients and optimizer state, checkpoints hold only them, and
    `ift export` writes a peft adapter directory (or, with --merge, the merged model)."""

    # "none" (full-parameter training) or "lora".
    type: AdapterType = AdapterType.none
    # LoRA rank: each adapted weight W (out x in) gets B (out x r) @ A (r x in).
    r: int = 16
    # LoRA scaling: the update is (alpha / r) x B @ A (alpha / sqrt(r) with use_rslora).
    alpha: float = 32.0
    # Dropout on the adapter's input (0 = none; it makes training depend on the dropout RNG).
    dropout: float = 0.05
    # Modules to adapt, by the last part of their name (q_proj, ...), or "all-linear" (every linear layer but the
    # output head). A name the model does not have is an error that lists the names it has.
    target_modules: Any = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Modules trained in full next to the adapter and saved with it (e.g. [embed_tokens, lm_head] when new tokens
    # were added to the vocabulary).
    modules_to_save: list[str] = field(default_factory=list)
    # Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r (better for large r).
    use_rslora: bool = False
    # DoRA: decompose each adapted weight into magnitude and direction (peft's use_dora).
    use_dora: bool = False
    # "default" or "gaussian" (both start equal to the base model).
    init: LoraInit = LoraInit.default

    @property
    def enabled(self) -> bool:
        return self.type != AdapterType.none

    def targets(self) -> str | list[str]:
        """target_modules as peft takes it: "all-linear" or a list of names."""
        value = self.target_modules
        return ALL_LINEAR if value == ALL_LINEAR or value == [ALL_LINEAR] else list(value)

    def validate(self, key: str) -> None:
        check_choices(self, key)
        check_positive(f"{key}.r", self.r)
        check_positive(f"{key}.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{key}.dropout: must be in [0, 1), got {self.dropout}")
        value = self.target_modules
        if isinstance(value, str):
            if value != ALL_LINEAR:
                raise ConfigError(
                    f"{key}.target_modules: a list of module names (e.g. [q_proj, v_proj]) or {ALL_LINEAR!r}, "
                    f"got the string {value!r}"
                )
        elif (
            not isinstance(value, list | tuple)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            raise ConfigError(
                f"{key}.target_modules: a non-empty list of module names or {ALL_LINEAR!r}, got {value!r}"
            )
        else:
            self.target_modules = list(value)
        if self.enabled and (self.use_dora and self.init == LoraInit.gaussian):
            raise ConfigError(
                f"{key}.use_dora: DoRA is not combined with init=gaussian here; use init=default"
            )


@dataclass
class QuantizationConfig:
    """QLoRA's quantized base (model.quantization): the frozen base weights stored in 4 bits by bitsandbytes (CUDA
    only), the adapter trained in compute_dtype. Needs model.adapter.type=lora."""

    # 0 = no quantization; 4 = bitsandbytes 4-bit (QLoRA).
    bits: int = 0
    # 4-bit data type: nf4 (QLoRA's NormalFloat) or fp4.
    type: QuantType = QuantType.nf4
    # Quantize the quantization constants too (QLoRA's double quantization; ~0.4 bit per parameter less).
    double_quant: bool = True
    # The dtype the 4-bit weights are dequantized to for each matmul, and their storage dtype (so ZeRO-3 can shard
    # the packed 4-bit weights like any tensor of that dtype, as transformers documents for bnb_4bit_quant_storage).
    compute_dtype: DType = DType.bfloat16

    @property
    def enabled(self) -> bool:
        return self.bits != 0

    def validate(self, key: str) -> None:
        check_choices(self, key)
        if self.bits not in (0, 4):
            raise ConfigError(f"{key}.bits: 0 (none) or 4 (QLoRA), got {self.bits}")
        if self.compute_dtype == DType.auto:
            raise ConfigError(f"{key}.compute_dtype: bfloat16, float16 or float32, not auto")
