"""One rank of one contender of bench/train_throughput.py, started by the `deepspeed` launcher: it trains and writes
when each optimizer step ended, its losses and the rank's peak memory to <workdir>/<contender>/rank<R>.json.

    deepspeed --num_gpus N bench/train_throughput_rank.py --contender ift|ift_reference|hf_padded|hf_flat --workdir DIR

Contenders (all read the same model, the same samples in the same micro batches, ZeRO-3 from the same JSON):
  ift        ift_dist.train on DIR/ift.yaml: packed rows, its attention backend and loss.
  ift_reference  the same with train.loss=reference (the model's logits + torch cross-entropy).
  hf_padded  transformers.Trainer, each micro batch = the samples of ift-dist's packed row(s), one sample per row,
             right-padded to the longest, attention_mask; the model's own loss (full logits).
  hf_flat    transformers.Trainer with DataCollatorWithFlattening: the same samples end to end in one row, position_ids
             restarting per sample (transformers turns them into a block-diagonal mask for sdpa/eager).

"Step end" is the same point for all: where the trainer logs a finished optimizer step (ift-dist: RunLogger.step,
wrapped here to take the time; Trainer: the on_step_end callback). At each step end the rank records the wall clock
and its CPU time (all threads of the process: work done, not time spent waiting for the CPU or for the other rank).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

IGNORE_INDEX = -100


def peak_memory_gb() -> float:
    """Peak memory of this process: torch's peak allocation on CUDA, else the resident-set high-water mark."""
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


# The LoRA contenders: the seeds' recipe on the attention projections (ift_dist.config.AdapterConfig's defaults).
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "[q_proj,k_proj,v_proj,o_proj]"}


def run_ift(workdir: Path, local_rank: int, contender: str) -> tuple[list[dict[str, Any]], float]:
    from ift_dist import metrics, train

    steps: list[dict[str, Any]] = []
    log_step = metrics.RunLogger.step

    def timed_step(self: Any, record: dict[str, Any]) -> None:
        keys = ("step", "loss", "grad_norm", "tokens", "supervised_tokens", "memory_gb")
        steps.append(
            {"time": time.perf_counter(), "cpu": time.process_time(), **{key: record[key] for key in keys}}
        )
        log_step(self, record)

    metrics.RunLogger.step = timed_step  # a timestamp per step; the trainer itself is untouched
    overrides = json.loads((workdir / "setup.json").read_text())["ift_overrides"]
    overrides = [*overrides, f"output_dir={workdir / contender}-run"]
    if contender == "ift_reference":
        overrides.append("train.loss=reference")
    if contender == "ift_lora":
        overrides += [f"model.adapter.{key}={value}" for key, value in LORA.items()] + [
            "model.adapter.type=lora"
        ]
    code = train.main([str(workdir / "ift.yaml"), *overrides, f"--local_rank={local_rank}"])
    if code != 0:
        raise SystemExit(code)
    # On CUDA ift-dist resets torch's peak statistics at every step: the peak is the largest per-step peak.
    return steps, max([peak_memory_gb(), *(step["memory_gb"] for step in steps)])


def pad_collate(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """One sample per row, right-padded to the longest sample of the micro batch."""
    samples = [sample for feature in features for sample in feature["samples"]]
    width = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(samples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(targets)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def flat_collate(features: list[dict[str, Any]], flattening: Any) -> dict[str, torch.Tensor]:
    """transformers' DataCollatorWithFlattening over the samples of the micro batch: one row, no padding."""
    samples = [sample for feature in features for sample in feature["samples"]]
    return flattening([{"input_ids": ids, "labels": targets} for ids, targets in samples])


def configure_cpu_deepspeed_state() -> None:
    """Let the Trainer run DeepSpeed on CPU ranks. TrainingArguments(deepspeed=...) gives accelerate no process-group
    backend; without CUDA, accelerate 1.15's PartialState then finds none and reports one process, so the "auto"
    train_batch_size comes out world-size times too small and DeepSpeed refuses the config. A PartialState built
    first with gloo (and DeepSpeed flagged, as TrainingArguments itself does) is reused through
    accelerator_config={"use_configured_state": True}."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]


def run_hf(workdir: Path, contender: str) -> tuple[list[dict[str, Any]], float]:
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    setup = json.loads((workdir / "setup.json").read_text())
    items = json.loads((workdir / "batches.json").read_text())  # item k = rank k % W's micro batch k // W
    bf16 = setup["dtype"] == "bfloat16"
    zero = json.loads(Path(setup["zero_config"]).read_text())
    # The same ZeRO section; the batch geometry, clipping and precision from TrainingArguments ("auto").
    ds_config = {
        **zero,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if bf16:
        ds_config["bf16"] = {"enabled": "auto"}
    on_cpu = not torch.cuda.is_available() or os.environ.get("DS_ACCELERATOR") == "cpu"
    if on_cpu:
        configure_cpu_deepspeed_state()
    args = TrainingArguments(
        output_dir=str(workdir / contender),
        per_device_train_batch_size=1,  # one item = the samples of one of ift-dist's micro batches
        gradient_accumulation_steps=setup["accumulation_steps"],
        max_steps=setup["steps"],
        learning_rate=setup["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        optim="adamw_torch_fused" if setup["fused_adamw"] else "adamw_torch",
        bf16=bf16,
        deepspeed=ds_config,  # before from_pretrained: the model is then built under deepspeed.zero.Init
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=setup["seed"],
        accelerator_config={"use_configured_state": on_cpu},
    )
    model = AutoModelForCausalLM.from_pretrained(
        setup["model"], dtype=getattr(torch, setup["dtype"]), attn_implementation=setup["hf_attention"]
    )
    model.config.use_cache = False
    if contender == "hf_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                task_type="CAUSAL_LM",
                r=LORA["r"],
                lora_alpha=LORA["alpha"],
                lora_dropout=LORA["dropout"],
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            ),
        )

    if contender in ("hf_padded", "hf_lora"):
        pad_id = setup["pad_id"]

        def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            return pad_collate(features, pad_id)
    else:
        flattening = DataCollatorWithFlattening()

        def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            return flat_collate(features, flattening)

    steps: list[dict[str, Any]] = []

    class Recorder(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            steps.append({"time": time.perf_counter(), "cpu": time.process_time(), "step": state.global_step})

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs and steps and steps[-1]["step"] == state.global_step:
                steps[-1]["loss"] = float(logs["loss"])
                steps[-1]["grad_norm"] = float(logs.get("grad_norm", float("nan")))

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[{"samples": item} for item in items],
        data_collator=collate,
        callbacks=[Recorder()],
    )
    trainer.train()
    return steps, peak_memory_gb()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--contender",
        required=True,
        choices=("ift", "ift_reference", "hf_padded", "hf_flat", "ift_lora", "hf_lora"),
    )
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--local_rank", type=int, default=0)  # from the deepspeed launcher
    args = parser.parse_args()
    started = time.perf_counter()
    if args.contender.startswith("ift"):
        steps, peak = run_ift(args.workdir, args.local_rank, args.contender)
    else:
        steps, peak = run_hf(args.workdir, args.contender)
    rank = int(os.environ.get("RANK", "0"))
    result = {"rank": rank, "peak_memory_gb": peak, "steps": steps, "seconds": time.perf_counter() - started}
    output = args.workdir / args.contender / f"rank{rank}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
