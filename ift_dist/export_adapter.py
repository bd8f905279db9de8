"""The export of an adapter run's checkpoint: a peft adapter directory (adapter_config.json, adapter_model.safetensors,
the tokenizer with the training chat template) that `PeftModel.from_pretrained` loads, or, merged into its base, a
full Hugging Face model directory.

    ift export RUN_DIR_OR_CHECKPOINT OUT_DIR            the adapter
    ift export RUN_DIR_OR_CHECKPOINT OUT_DIR --merge    the base with the adapter merged in (model.name_or_path of
                                                        the run, or --base)

The checkpoint holds the trainable parameters only (engine.save_shards with frozen_base): their fp32 values are
gathered from the ZeRO-3 shards and named as peft names them (get_peft_model_state_dict on a skeleton of the model
built on the meta device). The adapter file is checked before it is written: not empty, every adapter tensor there,
and no trained tensor all zeros (an empty or null adapter file is a known failure of LoRA under ZeRO-3 elsewhere).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ift_dist import engine as engine_lib
from ift_dist.adapter import ADAPTER_DIR, ADAPTER_NAME, quiet_peft
from ift_dist.checkpoint.run_dir import MODEL_FILES, TRAIN_STATE

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Files of model_files/ that describe the base model, not the adapter: an adapter directory must not hold them (a
# directory with config.json is read as a whole model).
BASE_MODEL_FILES = ("config.json", "generation_config.json")


def is_adapter_checkpoint(checkpoint: Path) -> bool:
    return (Path(checkpoint) / MODEL_FILES / ADAPTER_DIR / "adapter_config.json").is_file()


def skeleton(checkpoint: Path) -> Any:
    """The PeftModel of the run on the meta device (no memory): peft's names and the trainable parameters."""
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    from ift_dist.adapter import wrap

    files = Path(checkpoint) / MODEL_FILES
    trust = bool(_run_config(checkpoint)["model"].get("trust_remote_code", False))
    config = AutoConfig.from_pretrained(files, trust_remote_code=trust)
    lora = LoraConfig.from_pretrained(files / ADAPTER_DIR)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
        base.name_or_path = lora.base_model_name_or_path  # else peft warns that the base was renamed
        return wrap(base, lora)


def adapter_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """{peft's saved name: fp32 tensor} of the checkpoint's adapter, checked (`check_adapter`)."""
    from peft import get_peft_model_state_dict

    model = skeleton(checkpoint)
    # The engine trains CausalLMLoss: its parameter names are "model." + the HF model's; peft's are
    # "base_model.model." + the HF model's.
    weights = engine_lib.fp32_weights(Path(checkpoint))
    state = {f"base_model.model.{name.removeprefix('model.')}": value for name, value in weights.items()}
    # DeepSpeed names a parameter shared by two modules (tied copies) once, by its first name; peft asks for both.
    first: dict[int, str] = {}
    aliases = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if parameter.requires_grad:
            aliases[name] = first.setdefault(id(parameter), name)
    missing = sorted({name for name in aliases.values() if name not in state})
    if missing:
        raise ValueError(
            f"checkpoint {checkpoint} lacks {len(missing)} adapter parameters (e.g. {missing[0]}); it holds "
            f"{len(state)} tensors"
        )
    values = {name: state[name].contiguous().float() for name in set(aliases.values())}
    adapter = get_peft_model_state_dict(
        model,
        state_dict={name: values[source] for name, source in aliases.items()},
        adapter_name=ADAPTER_NAME,
    )
    check_adapter(adapter, expected=len(first), step=int(_train_state(checkpoint)["step"]))
    # Tied copies are one tensor under two names; safetensors stores tensors that share no memory.
    seen: set[int] = set()
    unshared = {}
    for name, tensor in adapter.items():
        unshared[name] = tensor.clone() if id(tensor) in seen else tensor.contiguous()
        seen.add(id(tensor))
    return unshared


def check_adapter(adapter: dict[str, torch.Tensor], *, expected: int, step: int) -> None:
    """ValueError if the adapter is empty, lacks tensors, or (after step 0) has a tensor that is all zeros: LoRA's B
    starts at zero, so an all-zero B after training means the trained values were lost."""
    if not adapter:
        raise ValueError("the adapter state dict is empty")
    if len(adapter) < expected:
        raise ValueError(f"the adapter has {len(adapter)} tensors, the model {expected} trainable parameters")
    zero = [name for name, tensor in adapter.items() if tensor.numel() == 0 or not bool(tensor.any())]
    if zero and step > 0:
        raise ValueError(f"{len(zero)} adapter tensors are all zeros after {step} steps (e.g. {zero[0]})")


def export_adapter(checkpoint: Path, out_dir: Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write the peft adapter directory of `checkpoint` into out_dir (which the caller has emptied)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    adapter = adapter_state_dict(checkpoint)
    if dtype is not None:
        adapter = {name: tensor.to(dtype) for name, tensor in adapter.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_WEIGHTS).chmod(0o644)
    files = checkpoint / MODEL_FILES
    config = LoraConfig.from_pretrained(files / ADAPTER_DIR)
    config.base_model_name_or_path = _run_config(checkpoint)["model"]["name_or_path"]
    config.inference_mode = True  # as peft's own save_pretrained writes it
    config.save_pretrained(out_dir)
    for path in files.iterdir():  # the tokenizer, with the chat template training rendered with
        if path.is_file() and path.name not in BASE_MODEL_FILES:
            shutil.copy2(path, out_dir / path.name)
    return out_dir


def load_base(checkpoint: Path, base: str | None = None) -> Any:
    """The run's base model, whole, in fp32 (model.name_or_path and gguf_file of the run, or `base`)."""
    from transformers import AutoModelForCausalLM

    from ift_dist.model import make_saveable

    model_cfg = _run_config(checkpoint)["model"]
    name = base or model_cfg["name_or_path"]
    options: dict[str, Any] = {
        "dtype": torch.float32,
        "trust_remote_code": bool(model_cfg.get("trust_remote_code")),
    }
    if model_cfg.get("gguf_file") and base is None:
        options["gguf_file"] = model_cfg["gguf_file"]
    if not Path(name).exists() and ("/" not in name or name.startswith((".", "/"))):
        raise FileNotFoundError(
            f"the base model {name!r} (model.name_or_path of the run) is not there from {Path.cwd()}; pass --base"
        )
    model = AutoModelForCausalLM.from_pretrained(name, **options)
    if options.get("gguf_file"):
        make_saveable(model)
    return model


def export_merged(
    checkpoint: Path,
    out_dir: Path,
    *,
    dtype: torch.dtype | None,
    max_shard_size: str,
    base: str | None = None,
) -> Path:
    """The base with the adapter merged in (peft's merge_and_unload), as a Hugging Face model directory in out_dir
    (which the caller has emptied): the adapter is written first and loaded back through PeftModel.from_pretrained,
    so the merged model is what a user loading the adapter directory gets."""
    from peft import PeftModel

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    adapter_dir = out_dir.with_name(f".{out_dir.name}.adapter")
    shutil.rmtree(adapter_dir, ignore_errors=True)
    export_adapter(checkpoint, adapter_dir)
    try:
        with quiet_peft():
            model = PeftModel.from_pretrained(load_base(checkpoint, base), adapter_dir).merge_and_unload()
    finally:
        shutil.rmtree(adapter_dir, ignore_errors=True)
    target = dtype or _training_dtype(checkpoint)
    model.to(target)
    model.config.use_cache = True
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    for path in (checkpoint / MODEL_FILES).iterdir():
        if path.is_file() and path.name != "config.json":  # tokenizer + template, generation config
            shutil.copy2(path, out_dir / path.name)
    return out_dir


def _train_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / TRAIN_STATE).read_text())


def _run_config(checkpoint: Path) -> dict[str, Any]:
    return _train_state(checkpoint)["config"]


def _training_dtype(checkpoint: Path) -> torch.dtype:
    from transformers import AutoConfig

    value = (
        getattr(AutoConfig.from_pretrained(Path(checkpoint) / MODEL_FILES), "dtype", None) or torch.float32
    )
    return getattr(torch, value) if isinstance(value, str) else value
