"""LoRA adapters on the loaded model, through peft: model.adapter -> peft's LoraConfig, the target names checked
against the model, the adapter injected into the Hugging Face model in place, and the parameter counts.

peft injects its LoRA layers into the model's own modules, so the HF model that CausalLMLoss wraps runs the adapter
in its forward, the fused loss reads the (frozen) output embedding as before, and DeepSpeed sees a model whose base
weights do not require grad: only the adapter is in the optimizer, and the checkpoints (which exclude frozen weights)
hold only the adapter. The PeftModel around it is kept for its config and its state-dict naming (ift_dist/export_adapter.py).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ift_dist.config import ALL_LINEAR, AdapterConfig, ConfigError

logger = logging.getLogger(__name__)

# The name peft gives the one adapter we train (in parameter names: ...q_proj.lora_A.default.weight).
ADAPTER_NAME = "default"
# Where training writes the adapter's config (adapter_config.json) next to the model's config (RunDir.model_files).
ADAPTER_DIR = "adapter"


def lora_config(cfg: AdapterConfig, *, tied_embeddings: bool = False) -> Any:
    """peft's LoraConfig of model.adapter (task CAUSAL_LM, no bias training). tied_embeddings: the model ties its
    output head to its input embeddings; a trained copy of either (modules_to_save) then stays tied to the other,
    as in the base (peft's ensure_weight_tying; without it the copies drift apart, huggingface/peft#2777)."""
    from peft import LoraConfig

    return LoraConfig(
        ensure_weight_tying=tied_embeddings and bool(cfg.modules_to_save),
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.targets(),
        modules_to_save=list(cfg.modules_to_save) or None,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        init_lora_weights=True if cfg.init == "default" else str(cfg.init),
    )  # peft records the base model's name_or_path itself


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The last name parts of the model's linear layers (what target_modules may name), output head included."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    return sorted(names)


def check_targets(model: torch.nn.Module, cfg: AdapterConfig, key: str = "model.adapter") -> None:
    """ConfigError unless every target_modules and modules_to_save name is a module of `model`; the message lists
    the linear layers the model has (peft's own error names only the first missing one, after building half the
    adapter)."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    targets = cfg.targets()
    if targets != ALL_LINEAR:
        linear = linear_module_names(model)
        missing = [name for name in targets if name not in linear]
        if missing:
            raise ConfigError(
                f"{key}.target_modules: {type(model).__name__} has no linear layer named "
                f"{', '.join(map(repr, missing))}; it has: {', '.join(linear)} (or use {ALL_LINEAR!r})"
            )
    missing = [name for name in cfg.modules_to_save if name not in leaves]
    if missing:
        raise ConfigError(
            f"{key}.modules_to_save: {type(model).__name__} has no module named {', '.join(map(repr, missing))}; "
            f"its top modules are: {', '.join(sorted(n for n, _ in model.named_children()))} and "
            f"{', '.join(linear_module_names(model))}"
        )


def apply_adapter(model: Any, cfg: AdapterConfig, *, seed: int) -> Any:
    """Inject the LoRA adapter of `cfg` into `model` (in place) and return the PeftModel around it; the base weights
    stop requiring grad. The adapter's initial values come from a generator seeded with `seed` alone, so every rank
    (and a run on another number of ranks) starts from the same adapter whatever the RNG did while loading."""
    check_targets(model, cfg)
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    config = lora_config(cfg, tied_embeddings=tied)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = wrap(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA adapter: %s", count_line(trainable, total))
    return peft_model


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Without the FutureWarning transformers 5 raises for the `is_gradient_checkpointing` attribute that peft
    (0.21) still reads whenever it wraps a model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def wrap(model: Any, config: Any) -> Any:
    """peft's get_peft_model (quietly)."""
    from peft import get_peft_model

    with quiet_peft():
        return get_peft_model(model, config)


def count_line(trainable: int, total: int) -> str:
    """The line peft's print_trainable_parameters prints."""
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def parameter_counts(model: Any, peft_model: Any = None) -> dict[str, int]:
    """{"trainable_parameters", "total_parameters"}: peft's own count for an adapter run (what
    print_trainable_parameters prints), else every parameter (ZeRO-3 shards by their full size, ds_numel)."""
    if peft_model is not None:
        trainable, total = peft_model.get_nb_trainable_parameters()
    else:
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
        trainable, total = sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)
    return {"trainable_parameters": int(trainable), "total_parameters": int(total)}
