"""A Hugging Face model directory from a checkpoint, written one parameter at a time: safetensors files cut by size,
config, generation config, and the tokenizer with the chat template used in training.

    ift export RUN_DIR_OR_CHECKPOINT OUT_DIR [--dtype bfloat16] [--max-shard-size 5GB]

The weights are DeepSpeed's fp32 master weights (ZeRO-3 shards of every rank), assembled one parameter at a time
from the memory-mapped shards (engine.fp32_weights) and written shard file by shard file, so the export never holds
more than one output file's worth of tensors. Everything else comes from the checkpoint's model_files/, written by
`save_model_files` when training starts. Training exports by itself at the end (export.at_end).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from ift_dist import engine as engine_lib
from ift_dist.checkpoint.discovery import latest_checkpoint
from ift_dist.checkpoint.protocol import verify
from ift_dist.checkpoint.run_dir import MODEL_FILES, TRAIN_STATE, RunDir
from ift_dist.config import Config, DType
from ift_dist.export_adapter import export_adapter, export_merged, is_adapter_checkpoint
from ift_dist.model import TORCH_DTYPES

logger = logging.getLogger(__name__)

PROVENANCE = "ift_export.json"


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 bytes ('5GiB' -> 5 * 2**30); a bare number is bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    factors = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    return int(number * factors[unit])


def save_model_files(
    directory: Path, model: Any, tokenizer: Any, chat_template: str | None, peft_model: Any = None
) -> None:
    """What an export needs besides the weights (rank 0, when training starts; every checkpoint copies it): the
    model's config (as for inference: KV cache on, the stock attention), its generation config, and the tokenizer
    carrying the chat template training rendered with (Renderer.chat_template), so inference formats prompts the same
    way. An adapter run adds the adapter's adapter_config.json in adapter/ (ift_dist/export_adapter.py)."""
    directory.mkdir(parents=True, exist_ok=True)
    if peft_model is not None:
        from ift_dist.adapter import ADAPTER_DIR, ADAPTER_NAME

        peft_model.peft_config[ADAPTER_NAME].save_pretrained(directory / ADAPTER_DIR)
    config = copy.deepcopy(model.config)
    config.use_cache = True
    config._attn_implementation = (
        None  # training's packed-attention function is registered in our process only
    )
    config.save_pretrained(directory)
    generation = copy.deepcopy(getattr(model, "generation_config", None))
    if generation is None:
        from transformers import GenerationConfig

        generation = GenerationConfig.from_model_config(config)
    generation.use_cache = True
    generation.save_pretrained(directory)
    previous = tokenizer.chat_template
    tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.chat_template = previous


def resolve_checkpoint(path: Path) -> Path:
    """A step_<N> directory as given, else the checkpoint `latest` names in a run or checkpoints directory (the
    rule of checkpoint.run_dir.locate, which checkpoint.resume follows too)."""
    return latest_checkpoint(Path(path))


def skeleton_names(config: Any, trust_remote_code: bool = False) -> tuple[dict[str, torch.Size], set[str]]:
    """({name: shape} of the HF model's state dict, names that are tied to an earlier one): what the export must
    write. The model is built on the meta device, so this costs no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    seen: set[int] = set()
    tied = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            tied.add(name)
        seen.add(id(parameter))
    return {name: tensor.shape for name, tensor in model.state_dict().items()}, tied


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Names in order, cut into files of at most max_bytes (a bigger tensor gets a file of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    *,
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    check: bool = True,
    overwrite: bool = False,
    merge: bool = False,
    base: str | None = None,
) -> Path:
    """Write the HF model directory of `checkpoint` (a step_<N> directory) to out_dir; returns out_dir.
    dtype: "auto" = the training dtype, or float32/bfloat16/float16. check: verify the checkpoint's files against its
    completion marker first. overwrite: replace an existing out_dir (else it must not exist or be empty).
    An adapter run's checkpoint gives a peft adapter directory, or with `merge` the base model (`base`, default
    the run's model.name_or_path) with the adapter merged in (ift_dist/export_adapter.py)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if check and (problems := verify(checkpoint)):
        raise ValueError(f"checkpoint {checkpoint} is not complete or intact: {'; '.join(problems)}")
    files = checkpoint / MODEL_FILES
    if not files.is_dir():
        raise FileNotFoundError(f"{files} is missing: the checkpoint was not written by ift-dist's trainer")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    state = json.loads((checkpoint / TRAIN_STATE).read_text())
    if is_adapter_checkpoint(checkpoint):
        return _export_adapter_run(checkpoint, out_dir, state, dtype, max_shard_size, merge, base)
    if merge:
        raise ValueError(
            f"--merge: {checkpoint} is a full-parameter checkpoint, there is no adapter to merge"
        )
    trust_remote_code = bool(state["config"]["model"].get("trust_remote_code", False))
    config = AutoConfig.from_pretrained(files, trust_remote_code=trust_remote_code)
    target = TORCH_DTYPES[dtype] if dtype != DType.auto else _config_dtype(config)
    shapes, tied = skeleton_names(config, trust_remote_code)
    weights = {
        name.removeprefix("model."): value for name, value in engine_lib.fp32_weights(checkpoint).items()
    }
    names = [name for name in shapes if name not in tied]
    missing = [name for name in names if name not in weights]
    wrong = [f"{n}: {tuple(weights[n].shape)} != {tuple(shapes[n])}" for n in names if n not in missing and
             tuple(weights[n].shape) != tuple(shapes[n])]  # fmt: skip
    if missing or wrong:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit its model config: missing {missing}, shapes {wrong}"
        )

    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    sizes = {name: shapes[name].numel() * _itemsize(weights[name], target) for name in names}
    shards = plan_shards(sizes, parse_size(max_shard_size))
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = {name: _materialise(weights[name], target) for name in shard}  # this file's tensors only
        save_file(tensors, str(partial / file_name), metadata={"format": "pt"})
        (partial / file_name).chmod(0o644)  # safetensors creates it readable by its owner only
        weight_map.update(dict.fromkeys(shard, file_name))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for path in files.iterdir():
        if path.is_file():
            shutil.copy2(path, partial / path.name)
    config.dtype = target  # the dtype the weights are stored in
    config.save_pretrained(partial)
    provenance = {"checkpoint": str(checkpoint.resolve()), "step": state["step"], "dtype": str(target)}
    (partial / PROVENANCE).write_text(json.dumps(provenance, indent=1) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    logger.info(
        "exported %s (step %d) to %s: %d file(s), %s", checkpoint, state["step"], out_dir, len(shards), target
    )
    return out_dir


def _export_adapter_run(
    checkpoint: Path,
    out_dir: Path,
    state: dict,
    dtype: str,
    max_shard_size: str,
    merge: bool,
    base: str | None,
) -> Path:
    """export_checkpoint of an adapter run: the adapter directory, or the merged model; the same partial-then-rename
    protocol and provenance file as a full model."""
    target = TORCH_DTYPES[dtype] if dtype != DType.auto else None
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    if merge:
        export_merged(checkpoint, partial, dtype=target, max_shard_size=max_shard_size, base=base)
    else:
        export_adapter(checkpoint, partial, dtype=target)
    provenance = {"checkpoint": str(checkpoint.resolve()), "step": state["step"], "adapter": not merge,
                  "merged": merge, "dtype": str(target) if target else "float32" if not merge else "training"}  # fmt: skip
    (partial / PROVENANCE).write_text(json.dumps(provenance, indent=1) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    logger.info("exported %s (step %d) to %s: %s", checkpoint, state["step"], out_dir,
                "merged model" if merge else "peft adapter")  # fmt: skip
    return out_dir


def export_dir(cfg: Config) -> Path:
    """Where training exports its final checkpoint (export.at_end): export.dir, else <output_dir>/hf_model."""
    return Path(cfg.export.dir) if cfg.export.dir else RunDir(cfg.output_dir).hf_model


def exported_message(model_dir: Path, *, adapter: bool) -> str:
    """What training prints after its export: how to chat with the model (how to continue a text when its tokenizer
    has no chat template: a run on raw-text sources only), or how to use the adapter."""
    if adapter:
        return (f"exported the LoRA adapter {model_dir} (load it with peft's PeftModel.from_pretrained on the base; "
                f"a merged model: ift export RUN_DIR OUT_DIR --merge)")  # fmt: skip
    if not has_chat_template(model_dir):
        return (
            f"exported {model_dir} (no chat template); continue a text with it: {complete_command(model_dir)}"
        )
    return f"exported {model_dir}; chat with it: {chat_command(model_dir)}"


def has_chat_template(model_dir: Path) -> bool:
    """Whether the tokenizer saved in `model_dir` carries a chat template (transformers 5 writes it to
    chat_template.jinja; older versions into tokenizer_config.json)."""
    if (model_dir / "chat_template.jinja").exists():
        return True
    config = model_dir / "tokenizer_config.json"
    return config.exists() and bool(json.loads(config.read_text()).get("chat_template"))


def complete_command(
    model_dir: Path, prompt: str = "Once upon a time", max_new_tokens: int = 64, python: str = "python"
) -> str:
    """A shell command that continues `prompt`, greedily, with an exported model that has no chat template."""
    code = (
        "from transformers import pipeline; "
        f'generate = pipeline("text-generation", model={json.dumps(str(model_dir))}); '
        f"print(generate({json.dumps(prompt)}, max_new_tokens={max_new_tokens}, do_sample=False, "
        'return_full_text=False)[0]["generated_text"])'
    )
    return f"{python} -c {shlex.quote(code)}"


def chat_command(
    model_dir: Path, prompt: str = "Who are you?", max_new_tokens: int = 64, python: str = "python"
) -> str:
    """A shell command that answers `prompt` with an exported model, greedily, through transformers' text-generation
    pipeline: the exported tokenizer's chat template (the one training rendered with, data.system_prompt included)
    formats the conversation. A run with data.chat_template_kwargs needs them passed as well."""
    code = (
        "from transformers import pipeline; "
        f'chat = pipeline("text-generation", model={json.dumps(str(model_dir))}); '
        f'messages = [{{"role": "user", "content": {json.dumps(prompt)}}}]; '
        f'print(chat(messages, max_new_tokens={max_new_tokens}, do_sample=False)[0]["generated_text"][-1]["content"])'
    )
    return f"{python} -c {shlex.quote(code)}"


def _config_dtype(config: Any) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, value) if isinstance(value, str) else value


def _itemsize(value: Any, target: torch.dtype) -> int:
    dtype = value.dtype if target is None or not value.dtype.is_floating_point else target
    return torch.empty((), dtype=dtype).element_size()


def _materialise(value: Any, target: torch.dtype) -> torch.Tensor:
    tensor = value.contiguous()  # a lazy ZeRO-3 parameter is assembled here, alone
    if tensor.dtype.is_floating_point:
        tensor = tensor.to(target)
    return tensor.contiguous()


def run(args: argparse.Namespace) -> int:
    """`ift export` (its arguments: ift_dist/cli.py). Exit code 1 with the reason when it cannot export."""
    try:
        checkpoint = resolve_checkpoint(Path(args.checkpoint))
        export_checkpoint(
            checkpoint,
            Path(args.out_dir),
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            check=not args.no_verify,
            overwrite=args.overwrite,
            merge=args.merge,
            base=args.base,
        )
    except (OSError, ValueError) as error:
        print(f"ift export: {error}", file=sys.stderr)
        return 1
    print(f"exported {checkpoint} to {args.out_dir}")
    return 0
