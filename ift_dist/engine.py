"""The DeepSpeed door (the only module that imports deepspeed): process group, the DeepSpeed config (ZeRO knobs from
the JSON + everything else from our config), ZeRO-3 model construction, initialize, backward/step, save.

The DeepSpeed JSON (train.zero_config, configs/ds_zero3/) may hold ZeRO knobs only. Batch sizes, clipping, precision,
optimizer and schedule are ift-dist's: a JSON that sets one of them is refused, naming our key to use instead, so a
run never has two sources of truth. Without CUDA everything runs on DeepSpeed's CPU accelerator over gloo.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch

from ift_dist.config import ConfigError, TrainConfig
from ift_dist.dist import local_rank, use_cuda
from ift_dist.optim import BatchPlan

logger = logging.getLogger(__name__)

# Top-level keys the DeepSpeed JSON may set: ZeRO itself, its NVMe I/O, and how gradients travel.
ZERO_KEYS = ("zero_optimization", "aio", "communication_data_type", "data_types", "comms_logger")

# Keys we set from our config; the value says where.
OWNED_KEYS = {
    "train_batch_size": "train.global_batch_rows or train.global_batch_tokens",
    "train_micro_batch_size_per_gpu": "train.micro_batch_rows",
    "gradient_accumulation_steps": "train.global_batch_rows (the accumulation steps are derived)",
    "gradient_clipping": "train.max_grad_norm",
    "fp16": "model.dtype",
    "bf16": "model.dtype",
    "amp": "model.dtype",
    "torch_autocast": "model.dtype",
    "optimizer": "train.learning_rate, train.weight_decay, train.adam_*",
    "scheduler": "train.lr_schedule, train.warmup_steps, train.min_lr_ratio",
    "activation_checkpointing": "model.gradient_checkpointing",
    "steps_per_print": "the metrics of ift-dist (metrics.jsonl)",
    "wall_clock_breakdown": "the metrics of ift-dist (metrics.jsonl)",
    "prescale_gradients": "nothing: the loss normalisation relies on DeepSpeed's plain gradient averaging",
    "gradient_predivide_factor": "nothing: the loss normalisation relies on DeepSpeed's plain gradient averaging",
    "zero_allow_untested_optimizer": "nothing: ift-dist chooses the optimizer",
}


def init_distributed() -> None:
    """Join the process group (env:// rendezvous from the launcher): NCCL on GPUs, gloo on CPU."""
    if use_cuda():
        torch.cuda.set_device(local_rank())
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda() else "gloo")
    # DeepSpeed logs its whole config and every step at INFO on rank 0; our metrics say what matters.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)


def load_zero_config(path: str | Path | None) -> dict[str, Any]:
    """The ZeRO knobs of `path` (null = plain stage 3), checked: owned and unknown keys are refused, stage is 3."""
    if path is None:
        return {"zero_optimization": {"stage": 3}}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.zero_config: {path} does not exist")
    try:
        zero = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"train.zero_config: {path} is not valid JSON: {error}") from error
    if not isinstance(zero, dict):
        raise ConfigError(f"train.zero_config: {path} must hold a JSON object")
    for key in zero:
        if key in OWNED_KEYS:
            raise ConfigError(
                f"train.zero_config: {path} sets {key!r}, which ift-dist sets itself from {OWNED_KEYS[key]}; "
                "remove it (the DeepSpeed JSON holds ZeRO knobs only)"
            )
        if key not in ZERO_KEYS:
            raise ConfigError(
                f"train.zero_config: {path} sets {key!r}, which is not a ZeRO knob; allowed: {', '.join(ZERO_KEYS)}"
            )
    section = zero.setdefault("zero_optimization", {})
    if not isinstance(section, dict):
        raise ConfigError(f"train.zero_config: {path}: zero_optimization must be an object")
    if section.setdefault("stage", 3) != 3:
        raise ConfigError(
            f"train.zero_config: {path} sets zero_optimization.stage={section['stage']}; ift-dist trains with "
            "ZeRO stage 3 (full parameter sharding)"
        )
    return zero


def build_config(
    zero: dict[str, Any], plan: BatchPlan, train: TrainConfig, dtype: torch.dtype
) -> dict[str, Any]:
    """The whole DeepSpeed config: the ZeRO knobs plus batch geometry, clipping and precision from our config."""
    config = json.loads(json.dumps(zero))  # a deep copy; DeepSpeed writes into the dict it is given
    config.update(
        train_batch_size=plan.global_batch_rows,
        train_micro_batch_size_per_gpu=plan.micro_batch_rows,
        gradient_accumulation_steps=plan.accumulation_steps,
        gradient_clipping=train.max_grad_norm,
        steps_per_print=2**62,  # never: metrics.jsonl and the progress bar report steps
        wall_clock_breakdown=False,
    )
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True, "loss_scale": 0}  # dynamic loss scaling
    return config


def hf_zero3_config(ds_config: dict[str, Any]) -> Any:
    """Keep the returned object alive for the whole run: while it lives, transformers' from_pretrained builds the
    model under deepspeed.zero.Init (each rank loads only its shards) and generate() keeps the ranks in step."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def build_optimizer(groups: list[dict[str, Any]], train: TrainConfig, ds_config: dict[str, Any]) -> Any:
    """AdamW over the parameter groups (optim.parameter_groups): DeepSpeed's CPU Adam when ZeRO offloads the
    optimizer to the CPU (a torch optimizer would be far slower there), else torch's (fused on CUDA)."""
    options = {
        "lr": train.learning_rate,
        "betas": (train.adam_beta1, train.adam_beta2),
        "eps": train.adam_epsilon,
    }
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **options)
    return torch.optim.AdamW(groups, fused=use_cuda(), **options)


def initialize(module: torch.nn.Module, optimizer: Any, ds_config: dict[str, Any]) -> Any:
    """The DeepSpeed engine around `module` (its parameters already partitioned by zero.Init, or partitioned now)."""
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine


@dataclass(frozen=True)
class StepResult:
    """What the optimizer step at an accumulation boundary did."""

    applied: bool  # False: DeepSpeed skipped it (non-finite gradient norm, or an fp16 overflow)
    grad_norm: float  # global 2-norm before clipping; inf/nan when non-finite


def backward_step(engine: Any, loss: torch.Tensor) -> StepResult | None:
    """Backward of one micro batch, then engine.step(), which DeepSpeed wants after every micro batch and which
    updates the weights only at the accumulation boundary: there it returns the StepResult, else None."""
    boundary = engine.is_gradient_accumulation_boundary()
    skipped = engine.skipped_steps
    engine.backward(loss)
    engine.step()
    if not boundary:
        return None
    norm = engine.get_global_grad_norm()
    norm = math.nan if norm is None else float(norm)
    return StepResult(applied=engine.skipped_steps == skipped, grad_norm=norm)


def save(engine: Any, directory: str | Path, tag: str, client_state: dict[str, Any] | None = None) -> Path:
    """A DeepSpeed checkpoint (sharded model + optimizer states) in directory/tag; every rank must call it."""
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state or {})
    return Path(directory) / tag
