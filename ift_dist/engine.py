"""The DeepSpeed door (the only module that imports deepspeed): process group, the DeepSpeed config (ZeRO knobs from
the JSON + everything else from our config), ZeRO-3 model construction, initialize, backward/step, and the ZeRO-3
shards of checkpoints: save, load, universal conversion, fp32 weights (ift_dist/checkpoint/ does the rest).

The DeepSpeed JSON (train.zero_config, configs/ds_zero3/) may hold ZeRO knobs only. Batch sizes, clipping, precision,
optimizer and schedule are ift-dist's: a JSON that sets one of them is refused, naming our key to use instead, so a
run never has two sources of truth. Without CUDA everything runs on DeepSpeed's CPU accelerator over gloo.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import deepspeed
import torch

from ift_dist.config import BatchPlan, ConfigError, TrainConfig
from ift_dist.config.choices import ZeroSingleRank
from ift_dist.dist import local_rank, use_cuda

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
    if not use_cuda():
        _unlink_shm_allreduce_segment()
    # DeepSpeed logs its whole config and every step at INFO on rank 0; our metrics say what matters.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)


def _unlink_shm_allreduce_segment() -> None:
    """DeepSpeed's CPU shared-memory allreduce (deepspeed/ops/csrc/cpu/comm/shm.cpp) creates a 66 MB /dev/shm
    segment per rank, named deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, and never unlinks it: every run
    leaks them until the machine reboots (18 GB after a day of tests here, then the OOM killer). It does so whenever
    all ranks are on one machine (LOCAL_SIZE == world size, set by DeepSpeed's launcher), one rank included. Each rank
    maps all its peers' segments inside init_distributed; once every rank is past it (the barrier; nothing to wait
    for with one rank), the names can go. The mappings stay valid until the processes exit, however they exit."""
    group = torch.distributed
    if not group.is_initialized():
        return
    if group.get_world_size() > 1:
        group.barrier()
    address, port = os.environ.get("MASTER_ADDR", "*"), os.environ.get("MASTER_PORT", "*")
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{address}_{port}_{group.get_rank()}"):
        path.unlink(missing_ok=True)


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
    if plan.world_size == 1 and train.zero_single_rank == ZeroSingleRank.persist:
        single_rank_persistence(config["zero_optimization"])
    return config


def single_rank_persistence(zero: dict[str, Any]) -> None:
    """On one rank, keep every parameter gathered (train.zero_single_rank=persist): writes into `zero` (the
    zero_optimization section). DeepSpeed 0.19, deepspeed/runtime/zero/:
    - parameter_offload.py mark_persistent_parameters: initialize marks ds_persist every parameter of at most
      param_persistence_threshold elements (within model_persistence_threshold, default sys.maxsize);
      partitioned_param_coordinator.py __params_to_release never releases those after their module, and stage3.py
      _post_step gathers them again after each optimizer step: the per-layer fetch finds them available.
    - On one rank a gather copies nothing (partition_parameters.py all_gather_coalesced, _allgather_params_coalesced
      -> _no_gather_coalesced: param.data becomes a view of its partition), so persistence costs no memory and leaves
      the numerics alone; not so with stage3_allgather_sequential (_allgather_params_sequential copies).
    - save_checkpoint partitions every parameter first (checkpoint_event_prologue) and gathers the persistent ones
      after (checkpoint_event_epilogue): the checkpoint holds the same ZeRO-3 shards.
    - The prefetch bucket stays: with nothing to fetch, the prefetch scan only drains the trace queue, and with
      stage3_prefetch_bucket_size 0 the coordinator checks each module against the recorded fetch order strictly
      (_fetch_sub_module_impl, "tracing error"), which a LoRA run resumed on one rank tripped (test_lora.py).
      overlap_comm stays: its stream still carries the gradient bucket copies (reduce_scatter_coalesced).
    Not applied with offload_param (persistence would keep the whole model on the GPU) or allgather_sequential (a
    second copy of every parameter). A persistence threshold in the JSON is tuning for many ranks (the shipped
    zero3.json sets one) and is overridden on one rank; train.zero_single_rank=zero3 keeps it."""
    offload = (zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
    sequential = zero.get("stage3_allgather_sequential") or zero.get("allgather_sequential")
    if offload or zero.get("cpu_offload_param") or sequential:
        why = "stage3_allgather_sequential" if sequential else "offload_param"
        logger.info("one rank: train.zero_single_rank=persist not applied (zero_optimization.%s)", why)
    else:
        zero.pop("param_persistence_threshold", None)  # DeepSpeed's other name for the same knob
        zero["stage3_param_persistence_threshold"] = sys.maxsize
        logger.info(
            "one rank: every parameter stays gathered, no per-layer gather/release (train.zero_single_rank=persist; "
            "checkpoints keep the ZeRO-3 format)"
        )


def zero3_init(ds_config: dict[str, Any]) -> Callable[[], AbstractContextManager[None]]:
    """The factory of the context under which transformers' from_pretrained builds a model under
    deepspeed.zero.Init, each rank loading only its shards (model.load_model(init_context=...)); models built
    outside a `with` block of it are whole (the export's skeleton). Generation needs no such context: the caller
    passes generate(synced_gpus=...) itself."""
    import importlib.util

    # transformers builds this on accelerate's DeepSpeed config; without accelerate it cannot partition the model
    # while loading, and every rank would load it whole. Refuse rather than fall back.
    if importlib.util.find_spec("accelerate") is None:
        raise RuntimeError(
            "ZeRO-3 model loading needs the `accelerate` package (transformers' DeepSpeed integration is built on "
            "it); it is a dependency of ift-dist: reinstall it with `pip install ift-dist` or `pip install accelerate`"
        )

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        from transformers.integrations.deepspeed import (
            HfDeepSpeedConfig,
            is_deepspeed_zero3_enabled,
            unset_hf_deepspeed_config,
        )

        # transformers reads the config through a module-level weak reference that the constructor sets: keep the
        # object referenced for the block, and clear the reference explicitly at its end.
        config = HfDeepSpeedConfig(ds_config)
        try:
            if not is_deepspeed_zero3_enabled():
                raise RuntimeError(
                    "transformers did not register the ZeRO-3 config: from_pretrained would not partition"
                )
            yield
        finally:
            unset_hf_deepspeed_config()
            del config

    return context


def check_partitioned(model: torch.nn.Module) -> None:
    """Raise unless from_pretrained built `model` under deepspeed.zero.Init (every parameter a ZeRO-3 shard): a model
    loaded whole on every rank still trains, but needs world-size times the memory, so it is an error, not a mode."""
    whole = [name for name, parameter in model.named_parameters() if not hasattr(parameter, "ds_id")]
    if whole:
        raise RuntimeError(
            f"the model was loaded whole on this rank, not partitioned by ZeRO-3 ({len(whole)} parameters, e.g. "
            f"{whole[0]}): transformers' DeepSpeed integration was not active while loading"
        )


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


class TrainEngine(Protocol):
    """What the training loop needs of the engine (deepspeed.DeepSpeedEngine is one): a call is the forward of the
    wrapped module, and backward + step run once per micro batch (`backward_step`)."""

    optimizer: Any  # DeepSpeed's wrapper of the torch optimizer; its param_groups take each step's LR
    module: torch.nn.Module  # the wrapped module (ift_dist.loss.CausalLMLoss)
    skipped_steps: int  # optimizer steps DeepSpeed skipped so far (non-finite gradients, fp16 overflow)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> None: ...

    def is_gradient_accumulation_boundary(self) -> bool: ...

    def get_global_grad_norm(self) -> float | None: ...

    def save_checkpoint(self, save_dir: str, tag: str | None = None, **kwargs: Any) -> Any: ...

    def load_checkpoint(self, load_dir: str, tag: str | None = None, **kwargs: Any) -> tuple[Any, Any]: ...


def initialize(module: torch.nn.Module, optimizer: Any, ds_config: dict[str, Any]) -> TrainEngine:
    """The DeepSpeed engine around `module` (its parameters already partitioned by zero.Init, or partitioned now)."""
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine


@dataclass(frozen=True)
class StepResult:
    """What the optimizer step at an accumulation boundary did."""

    applied: bool  # False: DeepSpeed skipped it (non-finite gradient norm, or an fp16 overflow)
    grad_norm: float  # global 2-norm before clipping; inf/nan when non-finite


def backward_step(engine: TrainEngine, loss: torch.Tensor) -> StepResult | None:
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


# ------------------------------------------------------------------------------------------------ checkpoints


class ShardSaveError(RuntimeError):
    """This rank could not write its part of a DeepSpeed checkpoint (disk full, permission denied, ...)."""


def allow_universal_load(ds_config: dict[str, Any]) -> None:
    """Make the engine built from `ds_config` load universal checkpoints (`convert_to_universal`): the way to
    resume ZeRO-3 shards written by another number of ranks. Call before `initialize`."""
    ds_config["checkpoint"] = {"load_universal": True}


def shard_files(engine: Any, directory: str | Path, tag: str) -> list[Path]:
    """The files DeepSpeed writes for this rank into directory/tag: its model states and its ZeRO partition of the
    optimizer states. DeepSpeed's own naming functions, so a renamed layout fails the checkpoint tests."""
    return [
        Path(engine._get_ckpt_name(str(directory), tag)),
        Path(engine._get_zero_ckpt_name(str(directory), tag)),
    ]


def save_shards(engine: Any, directory: str | Path, tag: str, *, frozen_base: bool = False) -> list[Path]:
    """This rank's ZeRO-3 shards (model and optimizer states) into directory/tag, which must exist; every rank must
    call it. Returns the files this rank wrote; raises ShardSaveError when a write failed. frozen_base (an adapter
    run): the frozen weights are left out, so the checkpoint holds the adapter and its optimizer state only (the
    base is loaded from model.name_or_path again on resume).

    DeepSpeed 0.19's save_checkpoint is: partition, barrier, tag check (all-reduce), this rank's writes, all-gather
    of the persistent parameters (checkpoint_event_epilogue), barrier. A rank whose write raises skips the last two
    and the others would wait for it forever; it runs them here before raising, so the ranks stay in step and every
    rank can learn about the failure afterwards (Checkpointer.save gathers it)."""
    try:
        engine.save_checkpoint(
            str(directory), tag=tag, client_state={}, save_latest=False, exclude_frozen_parameters=frozen_base
        )
    except (OSError, RuntimeError) as error:
        logger.error(
            "rank could not write its DeepSpeed checkpoint files into %s/%s: %s", directory, tag, error
        )
        if hasattr(engine.optimizer, "checkpoint_event_epilogue"):
            engine.optimizer.checkpoint_event_epilogue()
        deepspeed.comm.barrier()
        free = shutil.disk_usage(directory).free / 2**30
        raise ShardSaveError(f"{type(error).__name__}: {error} ({free:.1f} GiB free there)") from error
    return shard_files(engine, directory, tag)


def load_shards(
    engine: Any, directory: str | Path, tag: str, *, universal: bool, frozen_base: bool = False
) -> None:
    """Weights and optimizer states from directory/tag into the engine (every rank). `universal`: a universal
    checkpoint (another world size); the engine must have been built with `allow_universal_load`. frozen_base: the
    checkpoint has no frozen weights (save_shards), which keep the values the model was loaded with."""
    groups = [
        {key: value for key, value in group.items() if key != "params"}
        for group in engine.optimizer.param_groups
    ]
    path, _ = engine.load_checkpoint(
        str(directory),
        tag=tag,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
        load_module_strict=not frozen_base,
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {Path(directory) / tag}")
    if universal:
        _repair_universal_load(engine, groups)


@dataclass(frozen=True)
class EngineShards:
    """The engine as the checkpointer sees it (ift_dist.checkpoint.checkpointer.Shards): DeepSpeed writes and reads
    this rank's ZeRO-3 shards itself, through `save_shards` and `load_shards`."""

    engine: Any
    frozen_base: bool = False  # an adapter run: checkpoints hold the trainable parameters only

    def save(self, directory: Path, tag: str) -> list[Path]:
        return save_shards(self.engine, directory, tag, frozen_base=self.frozen_base)

    def load(self, directory: Path, tag: str, *, universal: bool) -> None:
        load_shards(self.engine, directory, tag, universal=universal, frozen_base=self.frozen_base)


def _repair_universal_load(engine: Any, groups: list[dict[str, Any]]) -> None:
    """Undo two slips of DeepSpeed 0.19's universal ZeRO-3 load with more than one parameter group
    (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3; multi-group universal loading was fixed only in part
    upstream, deepspeedai/DeepSpeed#7585). Without this, the resumed run drifts from the uninterrupted one
    (tests/dist/test_checkpoint_interrupted.py, resumed on 1 and 3 ranks, catches both):
    - it copies the hyperparameters of the first group into every group: the norms and biases would get the weight
      decay of the matrices (optim.parameter_groups). Ours are put back.
    - it gives every group's AdamW state one and the same `step` tensor, which torch's AdamW increments in place
      once per group and step: every group but one would count steps twice as fast (wrong bias correction). Each
      state gets its own copy."""
    for group, saved in zip(engine.optimizer.param_groups, groups, strict=True):
        group.update(saved)
    for state in engine.optimizer.optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def convert_to_universal(checkpoint_dir: Path, output_dir: Path, log_path: Path) -> None:
    """DeepSpeed's universal checkpoint of the ZeRO-3 shards in checkpoint_dir (one file per parameter and state,
    loadable by any number of ranks), written to output_dir. Runs `deepspeed.checkpoint.ds_to_universal` in a
    process of its own (it forks workers, which a process holding a process group or CUDA must not do); its output
    goes to log_path. One rank calls it."""
    workers = max(1, min(4, os.cpu_count() or 1))
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(checkpoint_dir),
    ]
    command += ["--output_folder", str(output_dir), "--num_extract_workers", str(workers)]
    command += ["--num_merge_workers", str(max(1, workers // 2))]
    with log_path.open("w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(
            f"converting {checkpoint_dir} to a universal checkpoint failed ({log_path}):\n{tail}"
        )


def fp32_weights(checkpoint_dir: Path) -> dict[str, Any]:
    """The fp32 weights of the ZeRO-3 checkpoint in checkpoint_dir, by the engine's parameter names, gathered one
    parameter at a time: each value has .shape and .dtype, and .contiguous() assembles that parameter alone from the
    ranks' (memory-mapped) partitions. Tied parameters share one value. DeepSpeed's zero_to_fp32, lazy mode."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    quiet = io.StringIO()
    with (
        contextlib.redirect_stdout(quiet),
        contextlib.redirect_stderr(quiet),
    ):  # its progress messages and bars
        return get_fp32_state_dict_from_zero_checkpoint(
            str(checkpoint_dir.parent), tag=checkpoint_dir.name, lazy_mode=True
        )
