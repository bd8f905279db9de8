"""Loading the pretrained causal LM to train: from a directory, hub id or GGUF file, ready for packed rows.

`load_model` = from_pretrained (inside the engine's init context, for ZeRO-3) + dtype rule + packed attention
backend (ift_dist.attention) + optional activation checkpointing (of every k-th decoder layer). It never imports
deepspeed: the engine passes the context in.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from ift_dist.attention import enable_packed_attention, select_backend
from ift_dist.config import DType, ModelConfig

logger = logging.getLogger(__name__)

# The torch dtype of every DType but auto (resolve_dtype decides that one).
TORCH_DTYPES = {DType.bfloat16: torch.bfloat16, DType.float16: torch.float16, DType.float32: torch.float32}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(requested: DType, device: Any) -> torch.dtype:
    """The weight dtype: "auto" = bfloat16 on a GPU, float32 on CPU (CPU bf16 is slow and loses the 1e-5 parity)."""
    if requested == DType.auto:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return TORCH_DTYPES[requested]


def load_adapted_model(
    config: ModelConfig,
    *,
    seed: int,
    device: Any = None,
    init_context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    before_adapter: Callable[[Any], None] | None = None,
) -> tuple[Any, str, Any]:
    """`load_model` for training, then model.adapter injected (ift_dist.adapter): (the HF model to train, its
    attention backend, the PeftModel around it or None for full-parameter training). before_adapter(model) runs
    first (the engine's check that every loaded weight is a ZeRO-3 shard). The adapter is injected inside
    `init_context`, where peft sees ZeRO-3 enabled and gathers the partitioned weights it reads (DoRA's norms)."""
    model, backend = load_model(config, device=device, training=True, init_context=init_context)
    if before_adapter is not None:
        before_adapter(model)
    if not config.adapter.enabled:
        return model, backend, None
    from ift_dist.adapter import apply_adapter

    with init_context():
        peft_model = apply_adapter(model, config.adapter, seed=seed)
    # Activation checkpointing needs no input that requires grad (non-reentrant): frozen embeddings are fine.
    return model, backend, peft_model


def quantization_config(config: ModelConfig, device: Any) -> Any:
    """transformers' BitsAndBytesConfig of model.quantization (QLoRA), refused without CUDA or bitsandbytes."""
    import importlib.util

    from ift_dist.config import ConfigError

    if torch.device(device).type != "cuda":
        raise ConfigError(
            "model.quantization: 4-bit QLoRA needs CUDA GPUs (bitsandbytes); this run is on the CPU. Train the LoRA "
            "adapter on the unquantized base instead (remove model.quantization)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.quantization: needs the bitsandbytes package: pip install 'ift-dist[qlora]'")
    from transformers import BitsAndBytesConfig

    compute = TORCH_DTYPES[config.quantization.compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=str(config.quantization.type),
        bnb_4bit_use_double_quant=config.quantization.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,  # ZeRO-3 shards the packed weights as tensors of this dtype
    )


def load_model(
    config: ModelConfig,
    *,
    device: Any = None,
    training: bool = True,
    init_context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[Any, str]:
    """The model and its packed-attention backend name (for `attention.packed_forward_kwargs`).

    device: where it will run (default: CUDA if present); decides the dtype and the attention backend. The model
    is not moved: under ZeRO-3 `init_context` partitions it onto the GPUs, otherwise the engine moves it.
    init_context: a factory of the context that from_pretrained runs inside. For ZeRO-3 it is
    `engine.zero3_init(ds_config)`: from_pretrained then builds the model under deepspeed.zero.Init and loads each
    weight into its shard.
    """
    from transformers import AutoModelForCausalLM

    device = default_device() if device is None else torch.device(device)
    dtype = resolve_dtype(config.dtype, device)
    if not config.name_or_path:
        raise ValueError("model.name_or_path: must name a local directory or a hub id")
    options: dict[str, Any] = {"dtype": dtype, "trust_remote_code": config.trust_remote_code}
    if config.gguf_file:
        local = Path(config.name_or_path)
        if local.is_dir() and not (local / config.gguf_file).is_file():
            raise FileNotFoundError(f"model.gguf_file: {local / config.gguf_file} does not exist")
        options["gguf_file"] = config.gguf_file
    bars = gguf_progress_bar_follows_transformers() if config.gguf_file else contextlib.nullcontext()
    if config.quantization.enabled:
        options["quantization_config"] = quantization_config(config, device)
    with init_context(), bars:
        model = AutoModelForCausalLM.from_pretrained(config.name_or_path, **options)
    if config.gguf_file:
        make_saveable(model)
    model.config.use_cache = False  # training keeps no KV cache
    backend = select_backend(model, config.attention, device=device, training=training)
    enable_packed_attention(model, backend)
    checkpointing = ""
    if config.gradient_checkpointing:
        selected, total = enable_gradient_checkpointing(model, every=config.gradient_checkpointing_every)
        checkpointing = f", activation checkpointing of {describe_layers(selected, total)}"
    logger.info(
        "loaded %s (%s, %.1fM parameters, %s, attention %s%s)",
        config.name_or_path,
        type(model).__name__,
        sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) / 1e6,  # ds_numel under zero.Init
        dtype,
        backend,
        checkpointing,
    )
    return model, backend


@contextlib.contextmanager
def gguf_progress_bar_follows_transformers() -> Iterator[None]:
    """While loading, transformers' GGUF reader draws its "Converting and de-quantizing GGUF tensors..." bar with
    transformers' own tqdm, which honours `transformers.utils.logging.disable_progress_bar()` (off on ranks other
    than 0, `dist.setup_logging`). Upstream imports `tqdm.auto.tqdm` directly in modeling_gguf_pytorch_utils.py
    (transformers 5.x), so that switch misses it and every rank draws the bar;
    tests/unit/test_progress_bars.py fails once upstream uses its own tqdm, and this can go."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original = gguf_utils.tqdm
    gguf_utils.tqdm = hf_logging.tqdm
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def make_saveable(model: Any) -> None:
    """A GGUF model is dequantized on load, but transformers still marks it quantized and refuses to save it; drop
    the marks so checkpoints and the exported model are plain safetensors of the trained weights."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)  # also clears is_quantized and quantization_method
    model.hf_quantizer = None
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        for name in ("quantization_config", "_is_quantized"):
            if hasattr(config, name):
                delattr(config, name)
    model.is_quantized = False


def enable_gradient_checkpointing(model: Any, every: int = 1) -> tuple[list[int], int]:
    """Non-reentrant checkpointing: it passes keyword tensors (the packed boundaries) through and needs no input
    that requires grad. The layers checkpoint only in train() mode. every=k: only decoder layers 0, k, 2k, ...
    recompute (model.gradient_checkpointing_every), through the per-layer flag of transformers'
    GradientCheckpointingLayer (its forward wrapper checkpoints when `self.gradient_checkpointing`; transformers' own
    every_n_layers counts the same way). Returns (the indices of the recomputing layers, the number of layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from ift_dist.config import ConfigError

    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    if every > 1 and not layers:
        raise ConfigError(
            f"model.gradient_checkpointing_every={every}: {type(model).__name__} has no layers built on transformers' "
            "GradientCheckpointingLayer, whose per-layer flag selects the layers; set it to 1 (every layer)"
        )
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0
    return [index for index, layer in enumerate(layers) if layer.gradient_checkpointing], len(layers)


def describe_layers(selected: list[int], total: int) -> str:
    """E.g. "every layer (16)", "8 of 16 layers (0, 2, ..., 14)"; a model without GradientCheckpointingLayer
    checkpoints as its own code says: "its layers"."""
    if not total:
        return "its layers"
    if len(selected) == total:
        return f"every layer ({total})"
    shown = (
        ", ".join(map(str, selected))
        if len(selected) <= 5
        else f"{selected[0]}, {selected[1]}, ..., {selected[-1]}"
    )
    return f"{len(selected)} of {total} layers ({shown})"
