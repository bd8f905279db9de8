"""Where a run's numbers go (<output_dir>/metrics.jsonl always, a progress bar and W&B on rank 0) and the arithmetic
behind them: FLOPs of a step, MFU, memory.

FLOPs of one optimizer step (docs/training.md), over the packed samples of lengths L_i it trained on:

    6 x N x sum_i L_i  +  6 x layers x (heads x head_dim) x sum_i L_i^2

N = parameters that take part in a matmul for every token: all of them except the input embedding (a lookup), the
output embedding counted even when tied to it. 6 = 2 FLOPs per multiply-add x (forward + backward = 3 passes). The
attention term is per packed sample, since a token attends only within its own sample: QK^T and AV cost 2 x 2 x L^2 x
width multiply-adds per layer, halved by the causal mask, x 3 for forward and backward. Activation recomputation
(gradient checkpointing) is not counted: this is MFU, not hardware FLOPs utilisation.
MFU = step FLOPs / (step seconds x world size x peak FLOP/s of one GPU).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ift_dist.checkpoint.run_dir import RunDir
from ift_dist.config import WandbConfig

logger = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per GPU from the vendors' data sheets (no sparsity). The first name found in the device
# name wins, so the more specific names come first. tracking.peak_tflops overrides.
PEAK_TFLOPS = (
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("MI300X", 1307.0),
)


@dataclass(frozen=True)
class FlopsModel:
    """What the FLOPs of a step depend on, read once from the model."""

    matmul_parameters: int
    layers: int
    attention_width: int  # heads x head_dim

    def flops(self, sample_lengths: Iterable[int]) -> float:
        """Training FLOPs (forward + backward) over packed samples of these lengths."""
        lengths = list(sample_lengths)
        tokens = sum(lengths)
        squares = sum(length * length for length in lengths)
        return 6.0 * self.matmul_parameters * tokens + 6.0 * self.layers * self.attention_width * squares


def _numel(parameter: torch.nn.Parameter) -> int:
    return int(getattr(parameter, "ds_numel", parameter.numel()))  # a ZeRO-3 shard knows its full size


def flops_model(model: Any) -> FlopsModel:
    config = model.config.get_text_config()
    total = sum(_numel(parameter) for parameter in model.parameters())  # shared (tied) parameters once
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    matmul = total - _numel(embedding) + (_numel(embedding) if tied else 0)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return FlopsModel(matmul, config.num_hidden_layers, heads * head_dim)


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (CPU, an unlisted GPU without tracking.peak_tflops)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    logger.warning("no peak FLOP/s known for %r: set tracking.peak_tflops to log MFU", name)
    return None


def memory_gb(device: torch.device) -> float:
    """Peak memory since the last call: GPU memory allocated by torch on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return kilobytes / 2**20


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf: non-finite numbers are written as null (the record says which were non-finite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------------ W&B


def wandb_init_arguments(
    config: WandbConfig, output_dir: Path, resolved: dict[str, Any], *, run_id: str | None, start_step: int
) -> dict[str, Any]:
    """wandb.init's arguments (settings aside) for a run that starts at start_step, given the stored W&B run id.

    A fresh start (step 0) is a new W&B run. A resume continues the stored run: rewound to start_step
    (`resume_from`), so that the steps after the checkpoint, which W&B already has from the interrupted attempt, are
    taken again; W&B drops a step that does not increase, so without the rewind (`resume="allow"`) they were lost.
    Offline, the rewind is recorded in the run's directory and done by `wandb sync` (docs/training.md)."""
    arguments = {
        "project": config.project,
        "entity": config.entity,
        "name": config.name or output_dir.resolve().name,
        "tags": list(config.tags),
        "mode": config.mode,
        "dir": str(output_dir),
        "config": resolved,
    }
    if run_id is None or start_step == 0:
        return arguments  # wandb makes a new id
    if config.rewind_on_resume:
        return {**arguments, "id": run_id, "resume_from": f"{run_id}?_step={start_step}"}
    return {**arguments, "id": run_id, "resume": "allow"}


def start_wandb(config: WandbConfig, output_dir: Path, resolved: dict[str, Any], start_step: int = 0) -> Any:
    """A W&B run (or None when disabled) with the resolved config attached. Its id is kept in
    <output_dir>/wandb_run_id: a run resumed in the same directory continues the same W&B run, rewound to the step
    it resumes from (wandb_init_arguments)."""
    if config.mode == "disabled":
        return None
    import wandb

    id_file = RunDir(output_dir).wandb_run_id
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    arguments = wandb_init_arguments(config, output_dir, resolved, run_id=run_id, start_step=start_step)
    settings = wandb.Settings(quiet=True, console="off", x_disable_stats=True, save_code=False)
    try:
        run = wandb.init(**arguments, settings=settings)
    except Exception as error:  # a server without rewind (a W&B preview feature) or without this run
        if "resume_from" not in arguments:
            raise
        logger.warning(
            "W&B could not rewind run %s to step %d (%s): continuing it without the rewind, so W&B drops the steps "
            "up to the last one it has from the interrupted attempt",
            run_id, start_step, error,
        )  # fmt: skip
        arguments = {key: value for key, value in arguments.items() if key != "resume_from"}
        run = wandb.init(**arguments, resume="allow", settings=settings)
    id_file.write_text(run.id + "\n")
    if run_id is not None and run.id != run_id:
        logger.info(
            "W&B: training starts at step 0, a new W&B run %s (run %s keeps its history)", run.id, run_id
        )
    elif "resume_from" in arguments and config.mode == "offline":
        logger.info(
            "W&B offline: run %s rewound to step %d; `wandb sync %s/offline-run-*` replays the rewind (all of the "
            "run's directories in one command: they are synced oldest first)",
            run.id, start_step, Path(run.dir).parent.parent,
        )  # fmt: skip
    logger.info("W&B run %s (%s)", run.id, config.mode)
    return run


# ------------------------------------------------------------------------------------------------ the logger


class RunLogger:
    """Rank 0's outputs of a run: metrics.jsonl (one object per optimizer step, one per evaluation), samples.jsonl,
    the progress bar and W&B. Holds open files and the W&B run, hence a class; on other ranks it does nothing."""

    def __init__(
        self,
        output_dir: Path,
        *,
        enabled: bool,
        max_steps: int,
        start_step: int = 0,
        wandb: WandbConfig | None = None,
        resolved_config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.run_dir = RunDir(output_dir)
        self.bar = self.file = self.run = None
        if not enabled:
            return
        from tqdm import tqdm

        self.file = self.run_dir.metrics.open("a")
        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=max_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5 if interactive else 30.0,  # a log file gets a line every 30 s, not every step
        )
        if wandb is not None:
            self.run = start_wandb(wandb, output_dir, resolved_config or {}, start_step)

    def _write(self, record: dict[str, Any], path: Path | None = None) -> None:
        """One JSON line into metrics.jsonl (kept open: a line per step), or into `path`."""
        line = json.dumps({key: finite_or_none(value) for key, value in record.items()}) + "\n"
        if path is None:
            self.file.write(line)
            self.file.flush()
        else:
            with path.open("a") as handle:
                handle.write(line)

    def step(self, record: dict[str, Any]) -> None:
        """One optimizer step: step, loss, lr, grad_norm, tokens, ... (see train.py)."""
        if not self.enabled:
            return
        self._write(record)
        # The numbers first, then the count: update() redraws the bar, which then shows this step with its own loss
        # (the other order showed step N with the loss of step N - 1).
        self.bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            tok_s=f"{record['tokens_per_second']:.0f}",
            refresh=False,
        )
        self.bar.update(record["step"] - self.bar.n)
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])

    def eval(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write(record)
        self.bar.write(
            f"step {record['step']}: eval_loss {record['eval_loss']:.4f}, "
            f"eval_perplexity {record['eval_perplexity']:.3f} ({record['eval_tokens']} tokens)"
        )
        if self.run is not None:
            self.run.log({f"eval/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])

    def benchmarks(self, record: dict[str, Any]) -> None:
        """The eval.benchmarks scores of one step (eval/<benchmark>/acc, ...)."""
        if not self.enabled:
            return
        self._write(record)
        scores = ", ".join(
            f"{key.split('/')[1]} acc {value:.4f}" for key, value in record.items() if key.endswith("/acc")
        )
        seconds = sum(value for key, value in record.items() if key.endswith("/seconds"))
        self.bar.write(f"step {record['step']}: {scores} ({seconds:.1f} s)")
        if self.run is not None:
            self.run.log({key: value for key, value in record.items() if key != "step"}, step=record["step"])

    def samples(self, step: int, when: str, answers: list[tuple[str, str]]) -> None:
        """The answers to the sample prompts (train.sample_prompts and its file), before or after training."""
        if not self.enabled:
            return
        for prompt, answer in answers:
            self._write(
                {"step": step, "when": when, "prompt": prompt, "answer": answer}, self.run_dir.samples
            )
            self.bar.write(f"[{when} training] {prompt!r} -> {answer!r}")
        if self.run is not None:
            import wandb

            table = wandb.Table(columns=["when", "prompt", "answer"], data=[[when, p, a] for p, a in answers])
            self.run.log({f"samples/{when}": table}, step=step)

    def parameters(self, step: int, counts: dict[str, int], line: str) -> None:
        """The trainable and total parameter counts (once per start): a metrics.jsonl record, the W&B summary."""
        if not self.enabled:
            return
        self._write({"step": step, **counts})
        self.bar.write(line)
        if self.run is not None:
            self.run.summary.update(counts)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.run is not None:
            self.run.finish()
