"""Whether a resume may use the new config: the keys that may change (how the run is carried out or reported) and
the refusal, naming every other changed key with its old and new value. docs/checkpoints.md."""

from __future__ import annotations

import logging
from typing import Any

from ift_dist.checkpoint.discovery import Resume
from ift_dist.config import Config, ConfigError, to_dict
from ift_dist.config.schema import DEFAULT_MAX_STEPS

logger = logging.getLogger(__name__)

# Config keys a resume may change: they alter how the run is carried out or reported, not what it computes
# (prefix match). Any other changed key is refused unless checkpoint.force_resume is set.
SAFE_TO_CHANGE = (
    "output_dir",
    "tracking.",
    "checkpoint.",
    "export.",
    "train.eval_every",
    "train.eval_batch_rows",
    "train.sample_prompts",  # and train.sample_prompts_file
    "train.sample_max_new_tokens",
    "train.sampling.",
    "train.max_bad_steps",
    "train.early_stopping.patience",  # when to stop, not what a step computes
    "train.early_stopping.min_delta",
    "train.save_at_end",
    "train.micro_batch_rows",  # the global batch stays the same rows; only the accumulation changes
    "train.zero_config",  # ZeRO knobs: sharding, buckets, offload
    "train.zero_single_rank",  # whether one rank keeps its parameters gathered: the same numerics and shards
    "model.attention",  # every backend computes the same attention
    "model.gradient_checkpointing",  # and model.gradient_checkpointing_every: recomputed, the same values
    "model.compile",  # the same layers run compiled: the same step, the same parameter names
    "train.fused_loss_dw",  # how the fused loss accumulates dW: the same gradient up to rounding
    "data.num_workers",
    "data.eval_sources",
)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _effective(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened config with keys its version lacked at their defaults and train.max_steps as the step count it
    means (0 with no train.num_epochs: the default count, which configs of earlier versions wrote out)."""
    values = {**flatten(to_dict(Config())), **flat}
    if not values.get("train.max_steps") and not values.get("train.num_epochs"):
        values["train.max_steps"] = DEFAULT_MAX_STEPS
    return values


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, allowed): the dotted keys whose value differs between two resolved configs (to_dict); a key the
    older config lacks counts as its default (it was added since)."""
    old_flat, new_flat = _effective(flatten(old)), _effective(flatten(new))
    changed = sorted(
        key for key in old_flat.keys() | new_flat.keys() if old_flat.get(key) != new_flat.get(key)
    )
    allowed = [key for key in changed if key.startswith(SAFE_TO_CHANGE)]
    return [key for key in changed if key not in allowed], allowed


def check_config(resume: Resume, cfg: Config) -> None:
    """Refuse a resume whose config changes what the run computes, naming the keys (unless forced)."""
    old, new = resume.state["config"], to_dict(cfg)
    refused, allowed = config_changes(old, new)
    if allowed:
        logger.info("resuming with changed settings: %s", ", ".join(allowed))
    if not refused:
        return
    old_flat, new_flat = _effective(flatten(old)), _effective(flatten(new))
    listing = "; ".join(f"{key}: {old_flat.get(key)!r} -> {new_flat.get(key)!r}" for key in refused)
    if cfg.checkpoint.force_resume:
        logger.warning(
            "resuming from %s with changed settings (checkpoint.force_resume): %s", resume.path, listing
        )
        return
    raise ConfigError(
        f"checkpoint.resume: the config differs from the one of checkpoint {resume.path} in keys that change the "
        f"run: {listing}. Restore them, start a new output_dir, or set checkpoint.force_resume=true"
    )
