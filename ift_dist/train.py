"""Full-parameter SFT under DeepSpeed ZeRO-3, read top to bottom: build, loop, close.

    deepspeed [--num_gpus N | --hostfile H] --module ift_dist.train CONFIG.yaml [key=value ...]
    ift train CONFIG.yaml [key=value ...] [--num-gpus N]          (one machine: checks the config, then the line above)
    python -m ift_dist.train CONFIG.yaml [key=value ...]          (one process, no launcher)

Without CUDA it trains on the CPU (DeepSpeed's CPU accelerator, gloo). Exit codes (ift_dist.exit_codes): 0 done
(the last step, or train.early_stopping), 1 an error (a failed checkpoint save too), 2 config error, 3 too many
non-finite steps in a row, 85 stopped by a signal or the deadline after saving a checkpoint: run the same command
again to resume. docs/training.md explains the batch arithmetic, the loss normalisation, every logged metric, epochs
and early stopping; docs/checkpoints.md saving, resuming, the best checkpoint, export.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ift_dist import compile as compile_lib
from ift_dist import dist, exit_codes
from ift_dist import engine as engine_lib
from ift_dist import export as export_lib
from ift_dist.adapter import count_line, parameter_counts
from ift_dist.attention import packed_forward_kwargs
from ift_dist.checkpoint import compat, discovery, universal
from ift_dist.checkpoint.checkpointer import Checkpointer
from ift_dist.checkpoint.protocol import CheckpointError, best_checkpoint
from ift_dist.checkpoint.run_dir import RunDir
from ift_dist.checkpoint.save_policy import SavePolicy, StopSignals, resolve_deadline
from ift_dist.checkpoint.state import Progress, rank_components
from ift_dist.config import Config, ConfigError, load_config, save_config, to_dict
from ift_dist.data.contracts import PackedBatch, RenderedSample
from ift_dist.data.epochs import count_epoch_rows, step_count
from ift_dist.data.holdout import write_test_split
from ift_dist.data.loader import PackedLoader, build_loader
from ift_dist.data.quality.stage import scan_training_sources
from ift_dist.data.render import Renderer, load_tokenizer
from ift_dist.data.views import format_sample
from ift_dist.early_stopping import EarlyStopping
from ift_dist.eval.in_training import check_benchmarks, score_benchmarks
from ift_dist.eval_loss import evaluate, evaluate_and_log
from ift_dist.loss import CausalLMLoss, deepspeed_backward_loss
from ift_dist.metrics import RunLogger, flops_model, memory_gb, peak_flops
from ift_dist.model import load_adapted_model, resolve_dtype
from ift_dist.optim import learning_rate, parameter_groups, set_learning_rate
from ift_dist.sample_prompts import answer_prompts, describe_decoding, read_sample_prompts

logger = logging.getLogger("ift_dist.train")  # not __main__ under -m


class TooManyBadSteps(RuntimeError):
    """train.max_bad_steps optimizer steps in a row had a non-finite loss or gradient norm."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ift_dist.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="run config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    parser.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # from the deepspeed launcher
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    dist.set_single_process_defaults()
    dist.setup_logging(args.verbose)
    code = exit_codes.FAILED
    try:
        code = train(load_config(args.config, args.overrides))
    except ConfigError as error:
        logger.error("config error: %s", error)
        code = exit_codes.CONFIG_ERROR
    except TooManyBadSteps as error:
        logger.error("%s", error)
        code = exit_codes.TOO_MANY_BAD_STEPS
    except CheckpointError as error:
        logger.error("%s", error)
        code = exit_codes.FAILED
    except Exception:
        # Exit 1 with the traceback, as Python would, but through dist.exit_process like every other end.
        logger.exception("training failed")
        code = exit_codes.FAILED
    finally:
        # OK and REQUEUE: every rank got here at the same step, after the last collective (the save).
        dist.shutdown(together=code in (exit_codes.OK, exit_codes.REQUEUE))
    return code


def train(cfg: Config) -> int:
    # ================================================================================================ build
    # Config errors first, before any rank waits for the others (the launcher's environment gives the world size).
    rank, world_size, device = dist.rank(), dist.world_size(), dist.device()
    plan = cfg.batch_plan(world_size)
    dtype = resolve_dtype(cfg.model.dtype, device)
    zero = engine_lib.load_zero_config(cfg.train.zero_config)
    ds_config = engine_lib.build_config(zero, plan, cfg.train, dtype)
    deadline = resolve_deadline(cfg.checkpoint.deadline)
    engine_lib.init_distributed()
    dist.seed_everything(cfg.seed)
    signals = StopSignals()
    signals.install()  # from now on SIGTERM/SIGUSR1 mean: save at the next step boundary, exit REQUEUE
    run = RunDir(cfg.output_dir)  # every path of the run
    resume = discovery.find_resume(cfg.checkpoint.resume, run.root, checksums=cfg.checkpoint.checksums)
    if resume is not None:
        compat.check_config(resume, cfg)
        if resume.world_size != world_size:  # the ZeRO-3 shards are re-cut through a universal checkpoint
            universal.prepare(resume, engine_lib.convert_to_universal)
            engine_lib.allow_universal_load(ds_config)
    logger.info("%s", plan.describe())
    if rank == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)

    # What happens before the first step takes a while (minutes for a big model): rank 0 says what it is doing.
    logger.info("loading the tokenizer %s", cfg.tokenizer_path)
    tokenizer = load_tokenizer(cfg.tokenizer_path)

    renderer = Renderer(tokenizer, cfg.data)
    check_benchmarks(cfg.eval.benchmarks)  # their files are read now, not at the first evaluation
    sample_set = read_sample_prompts(cfg.train)  # likewise train.sample_prompts_file
    if cfg.data.prepared:
        logger.info("reading the prepared data %s", cfg.data.prepared)
    else:
        logger.info(
            "scanning the records of %d data sources (each record parsed and checked): %s",
            len(cfg.data.sources), ", ".join(source.path for source in cfg.data.sources),
        )  # fmt: skip
    # With data.quality: duplicates, contamination and filtered records out (rank 0 decides, all ranks apply).
    scanned = (
        None
        if cfg.data.prepared
        else scan_training_sources(cfg.data, tokenizer=tokenizer, work_dir=run.quality)
    )
    shards = {"rank": rank, "world_size": world_size, "renderer": renderer}
    train_loader = build_loader(
        cfg.data, tokenizer, rows_per_batch=plan.micro_batch_rows, split="train", scanned=scanned, **shards
    )
    eval_loader = None
    if cfg.data.eval_sources or cfg.data.eval_fraction > 0:
        eval_scanned = None if cfg.data.eval_sources else scanned
        eval_rows = cfg.train.eval_batch_rows or plan.micro_batch_rows
        eval_loader = build_loader(
            cfg.data, tokenizer, rows_per_batch=eval_rows, split="eval", scanned=eval_scanned, **shards
        )
    if rank == 0 and scanned is not None:  # data.test_fraction's records, for evaluation after training
        write_test_split(cfg.data, scanned, run.test_split)
    # train.max_steps, or train.num_epochs counted in steps from the packed rows of one epoch (data/epochs.py).
    count_rows = functools.partial(
        count_epoch_rows, cfg.data, tokenizer, plan, scanned=scanned, renderer=renderer
    )
    steps = step_count(cfg.train, plan, saved=resume.state if resume else None, count_rows=count_rows)
    max_steps = steps.total
    logger.info("training for %s", steps.describe())

    logger.info(
        "loading the model %s%s (%s), partitioned over %d ranks by ZeRO-3 as it loads",
        cfg.model.name_or_path, f" / {cfg.model.gguf_file} (de-quantized)" if cfg.model.gguf_file else "", dtype,
        world_size,
    )  # fmt: skip
    # transformers dequantizes a GGUF file outside zero.Init; deepspeed.initialize partitions it afterwards. With
    # model.adapter, LoRA goes into the loaded model (partitioned by deepspeed.initialize) and the base is frozen.
    if cfg.model.gguf_file:
        logger.info("GGUF: loaded whole on every rank, then partitioned by ZeRO-3 (a model directory is not)")
    model, backend, peft_model = load_adapted_model(
        cfg.model, seed=cfg.seed, device=device, init_context=engine_lib.zero3_init(ds_config),
        before_adapter=None if cfg.model.gguf_file else engine_lib.check_partitioned,  # each rank: its shard only
    )  # fmt: skip
    model.train()  # load_model leaves it in eval()
    # model.compile: regional torch.compile; each layer becomes a ZeRO-3 leaf module, so before initialize.
    if cfg.model.compile:
        compile_lib.compile_decoder_layers(model, ds_config)
    if rank == 0:  # for the export; every checkpoint copies them
        export_lib.save_model_files(run.model_files, model, tokenizer, renderer.chat_template, peft_model)
    module = CausalLMLoss(model, cfg.train.loss, cfg.train.fused_loss_dw.value)
    groups = parameter_groups(module.named_parameters(), cfg.train.weight_decay)
    optimizer = engine_lib.build_optimizer(groups, cfg.train, ds_config)
    logger.info(
        "starting DeepSpeed ZeRO-3 on %d ranks (gradients and optimizer states partitioned too)", world_size
    )
    engine = engine_lib.initialize(module, optimizer, ds_config)
    flops, peak = flops_model(model), peak_flops(device, cfg.tracking.peak_tflops)

    progress = Progress()  # steps done, tokens seen, ...
    # The best value of the eval metric so far, for train.early_stopping and checkpoint.keep_best.
    watching = cfg.train.early_stopping.enabled or cfg.checkpoint.keep_best
    watch = EarlyStopping(cfg.train.early_stopping) if watching else None
    checkpointer = Checkpointer(
        run,
        cfg,
        shards=engine_lib.EngineShards(engine, frozen_base=peft_model is not None),
        progress=progress,
        components=rank_components(train_loader, cfg.seed),
        shared={"early_stopping": watch} if watch else {},
        steps=steps.state_dict(),
    )
    if resume is not None:
        checkpointer.restore(resume)
        if rank == 0:
            run.truncate_metrics(progress.step)
    before = []  # answers to train.sample_prompts before training (a fresh run only)
    if sample_set and progress.step == 0:
        logger.info(
            "generating the answers before training to %d train.sample_prompts (%s)",
            len(sample_set), describe_decoding(cfg.train),
        )  # fmt: skip
        before = answer_prompts(model, tokenizer, renderer, cfg, backend, device, sample_set)
    log = RunLogger(  # draws rank 0's progress bar; what is printed from now on goes above it
        run.root,
        enabled=rank == 0,
        max_steps=max_steps,
        start_step=progress.step,
        wandb=cfg.tracking.wandb,
        resolved_config=to_dict(cfg),
    )
    counts = parameter_counts(model, peft_model)  # peft's print_trainable_parameters line, for adapter runs
    log.parameters(
        progress.step, counts, count_line(counts["trainable_parameters"], counts["total_parameters"])
    )
    if before:
        log.samples(0, "before", before)
    benchmarks = functools.partial(score_benchmarks, model, tokenizer, cfg.eval.benchmarks, run=run, backend=backend,
                                   device=device, chat_template=renderer.chat_template)  # fmt: skip
    if cfg.eval.benchmarks and cfg.eval.at_start and progress.step == 0:
        log.benchmarks(benchmarks(step=0))
    eval_loss = functools.partial(evaluate, engine, eval_loader, backend, device, tokenizer=tokenizer)
    evaluations = functools.partial(evaluate_and_log, log=log, eval_loss=eval_loss if eval_loader else None,
                                    benchmarks=benchmarks if cfg.eval.benchmarks else None)  # fmt: skip
    policy = SavePolicy(cfg.checkpoint, max_steps, signals, deadline)

    # ================================================================================================ loop
    batches = iter(train_loader)
    step = progress.step
    saved_step = progress.step if resume is not None else None  # the step of the newest checkpoint
    stopped = None  # why the loop stopped before the end, to be resumed
    # Why early stopping ended the run (it is then done; a restart of a stopped run trains no further).
    finished_early = watch.reason() if watch and watch.should_stop else None
    while step < max_steps and finished_early is None:
        started = time.perf_counter()
        lr = learning_rate(step, cfg.train, max_steps)
        set_learning_rate(engine.optimizer, lr)
        micro_batches = [next(batches) for _ in range(plan.accumulation_steps)]
        if step == 0 and rank == 0:
            log.message(first_sample_text(micro_batches[0], tokenizer))
        # The loss is divided by the supervised tokens of the whole step, so they are counted before any backward.
        lengths = [length for batch in micro_batches for row in batch.seq_lens for length in row]
        local = [
            sum(batch.num_loss_tokens for batch in micro_batches),
            sum(lengths),
            sum(batch.input_ids.shape[0] for batch in micro_batches),
            len(lengths),
            flops.flops(lengths),
        ]
        step_tokens, tokens, rows, samples, step_flops = dist.all_reduce(local)

        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch in micro_batches:
            kwargs = packed_forward_kwargs(batch, backend, device=device)
            micro_loss = engine(labels=batch.labels.to(device), **kwargs)
            backward_loss = deepspeed_backward_loss(
                micro_loss, int(step_tokens), world_size, plan.accumulation_steps
            )
            result = engine_lib.backward_step(engine, backward_loss)
            loss_sum += micro_loss.detach().double()
        if result is None:
            raise RuntimeError("DeepSpeed did not reach its accumulation boundary at the end of the step")
        loss = dist.all_reduce([loss_sum.item()])[0] / max(step_tokens, 1)
        seconds = time.perf_counter() - started

        skipped = not result.applied or not math.isfinite(loss) or not math.isfinite(result.grad_norm)
        progress.update(int(tokens), int(step_tokens), int(samples), skipped)
        step = progress.step
        log.step(
            {
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "skipped": skipped,
                "tokens": int(tokens),
                "supervised_tokens": int(step_tokens),
                "samples": int(samples),
                "rows": int(rows),
                "packing_efficiency": tokens / (rows * cfg.data.max_length),
                "tokens_per_second": tokens / seconds,
                "mfu": step_flops / (seconds * world_size * peak) if peak else None,
                "memory_gb": memory_gb(device),
                "step_seconds": seconds,
                "epoch": train_loader.report()["epoch"],
            }
        )
        if cfg.model.compile and rank == 0 and step in (1, max_steps):  # recompiles show up at the end
            log.message(compile_lib.graph_report())
        bad_in_a_row = progress.bad_in_a_row
        if skipped:
            logger.warning("step %d skipped: loss %s, gradient norm %s", step, loss, result.grad_norm)
        failure = None
        if skipped and result.applied:
            failure = f"step {step}: the loss is {loss} but DeepSpeed applied the update; the weights may be corrupt"
        elif bad_in_a_row >= cfg.train.max_bad_steps:
            failure = (
                f"{bad_in_a_row} optimizer steps in a row (up to step {step}) had a non-finite loss or gradient "
                f"norm and were skipped (train.max_bad_steps={cfg.train.max_bad_steps}); stopping. Lower "
                "train.learning_rate, check the data, or use bfloat16 instead of float16"
            )
        if failure is not None:
            log.close()  # metrics.jsonl and the W&B run end with the failed step
            raise TooManyBadSteps(failure)
        every, best = cfg.train.eval_every, False
        if every and step % every == 0 and step < max_steps:  # the last step: below
            scores = evaluations(step)
            best = watch is not None and watch.update(step, scores)  # every rank: the same scores
        decision = policy.decide(step, seconds)  # every rank: the same answer
        keep_best = best and cfg.checkpoint.keep_best  # each new best is saved, then kept
        if decision.save or keep_best:
            reason = decision.reason or f"best {watch.metric} so far"
            saved = save_checkpoint(checkpointer, train_loader, log, policy, reason)
            saved_step = step if saved else saved_step
        if keep_best and saved_step == step:
            checkpointer.mark_best(step)
        if watch is not None and watch.should_stop:
            finished_early = watch.reason()
            break
        if decision.stop:
            stopped = decision.reason
            break

    # ================================================================================================ close
    if stopped is not None:
        log.message(f"stopped after step {step}: {stopped}; run the same command again to resume")
        log.close()
        return exit_codes.REQUEUE
    if finished_early is not None:  # evaluated at this step already
        best = False
        log.message(f"stopped after step {step}: {finished_early}")
    else:  # the final evaluation runs whether or not something watches it
        scores = evaluations(step)
        best = watch is not None and watch.update(step, scores)
    if sample_set:
        log.samples(
            step, "after", answer_prompts(model, tokenizer, renderer, cfg, backend, device, sample_set)
        )
    keep_best = best and cfg.checkpoint.keep_best
    if (cfg.train.save_at_end or keep_best or finished_early) and saved_step != step:
        reason = "early stopping" if finished_early else "end of training"
        saved = save_checkpoint(checkpointer, train_loader, log, policy, reason)
        saved_step = step if saved else saved_step
    if keep_best and saved_step == step:
        checkpointer.mark_best(step)
    if cfg.export.at_end and rank == 0:
        export_final(cfg, run, step if saved_step == step else None, log)
    log.close()
    # The launcher's proof that the run finished (exit_codes.write_finished_record), whatever its teardown does.
    if rank == 0 and saved_step == step:
        exit_codes.write_finished_record(step, str(run.root))
    return exit_codes.OK


def export_final(cfg: Config, run: RunDir, final_step: int | None, log: RunLogger) -> None:
    """Rank 0 (the other ranks are done): the Hugging Face model of the checkpoint `best` names (checkpoint.keep_best),
    else of the final step's (final_step: None when it has none)."""
    checkpoint = best_checkpoint(run.checkpoints) if cfg.checkpoint.keep_best else None
    if checkpoint is not None:
        log.message(f"exporting the best checkpoint {checkpoint} (checkpoint.keep_best)")
    elif final_step is not None:
        checkpoint = run.step(final_step)
    else:
        logger.warning("export.at_end: no checkpoint of the final step (train.save_at_end is off)")
        return
    exported = export_lib.export_checkpoint(
        checkpoint,
        export_lib.export_dir(cfg),
        dtype=cfg.export.dtype,
        max_shard_size=cfg.export.max_shard_size,
        check=False,  # just written
        overwrite=True,
        merge=cfg.export.merge and cfg.model.adapter.enabled,
    )
    log.message(
        export_lib.exported_message(exported, adapter=cfg.model.adapter.enabled and not cfg.export.merge)
    )


def save_checkpoint(
    checkpointer: Checkpointer, loader: PackedLoader, log: RunLogger, policy: SavePolicy, reason: str
) -> Path | None:
    """A checkpoint of this step (every rank). A failed save raises (checkpoint.on_save_error=stop) or is logged,
    and training goes on (continue); either way the previous checkpoints are untouched."""
    started = time.perf_counter()
    try:
        path = checkpointer.save(epoch=loader.report()["epoch"])
    except CheckpointError as error:
        if checkpointer.cfg.checkpoint.on_save_error == "stop":
            raise
        logger.error("%s; training goes on (checkpoint.on_save_error=continue)", error)
        return None
    seconds = time.perf_counter() - started
    policy.saved(seconds)
    log.message(f"saved {path} ({reason}) in {seconds:.1f} s")
    return path


# The first training sample is a glance, not a page (`ift data preview` shows whole samples).
FIRST_SAMPLE_CHARS = 400
FIRST_SAMPLE_LINES = 8


def first_sample_text(batch: PackedBatch, tokenizer: Any, *, color: bool | None = None) -> str:
    """The start of the first packed sample of the first batch, supervised tokens marked: what the model is trained
    on, cut to a few lines, then where to see whole samples. color: None = when stdout is a terminal."""
    length = batch.seq_lens[0][0]
    ref = batch.refs[0][0] if batch.refs and batch.refs[0] else None
    sample = RenderedSample(batch.input_ids[0, :length].tolist(), batch.labels[0, :length].tolist(), ref)
    color = sys.stdout.isatty() if color is None else color  # RunLogger.message writes to stdout
    text = format_sample(
        sample, tokenizer, color=color, max_chars=FIRST_SAMPLE_CHARS, max_lines=FIRST_SAMPLE_LINES
    )
    marks = "in green" if color else "between [[ ]]"
    return f"first training sample:\n{text}\n(supervised text {marks}; see `ift data preview CONFIG` for whole samples)"


if __name__ == "__main__":
    dist.exit_process(main())  # no interpreter teardown: see dist.exit_process
