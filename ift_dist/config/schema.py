"""The run configuration's schema: the `Config` of a whole run and its model, train, tracking, checkpoint and export
sections (the data section is in data_schema.py), each field with its default and documentation, the checks of values
and of fields against each other, and the values derived from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ift_dist.config.adapter_schema import AdapterConfig, QuantizationConfig
from ift_dist.config.batch import BatchPlan, batch_plan
from ift_dist.config.checks import ConfigError, check_choices, check_positive
from ift_dist.config.choices import (
    AttentionBackend,
    DType,
    LossMode,
    LrSchedule,
    MetricMode,
    OnSaveError,
    WandbMode,
    WeightGradPass,
    ZeroSingleRank,
)
from ift_dist.config.data_schema import DataConfig
from ift_dist.config.eval_schema import EvalConfig, benchmark_label
from ift_dist.config.sampling_schema import SamplingOptions

# --------------------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """The pretrained causal LM to fine-tune."""

    # Local directory or hub id of an AutoModelForCausalLM.
    name_or_path: str = ""
    # A GGUF file inside name_or_path to load (dequantized) instead of safetensors.
    gguf_file: str | None = None
    # Allow the model's own Python code from its repository. Off unless the user sets it.
    trust_remote_code: bool = False
    # Weight dtype: "auto" = bfloat16 on GPUs, float32 on CPU; or bfloat16, float16, float32.
    dtype: DType = DType.auto
    # Attention kernel for packed rows: "auto" (flash_attn if installed, else torch_varlen, else flex on CUDA;
    # sdpa on CPU), flash_attn, torch_varlen, flex, sdpa, eager. See ift_dist/attention.py.
    attention: AttentionBackend = AttentionBackend.auto
    # Recompute each decoder layer's activations in the backward pass: less memory, ~30% more compute.
    gradient_checkpointing: bool = False
    # With gradient_checkpointing: only every k-th decoder layer (layers 0, k, 2k, ...) recomputes, the others keep
    # their activations: more memory than k=1, less recompute (k=2: about half the extra compute). 1 = every layer.
    # Needs a model built of transformers' GradientCheckpointingLayer when > 1 (ift_dist/model.py).
    gradient_checkpointing_every: int = 1
    # Regional torch.compile: each decoder layer's forward compiled in place (one graph shared by the identical
    # layers), ZeRO-3 gathering each layer whole around it. Composes with gradient_checkpointing; refused with
    # adapter (and so quantization). The first steps are slower (compilation). ift_dist/compile.py, docs/training.md.
    compile: bool = False
    # Train an adapter (LoRA) instead of every weight: ift_dist/config/adapter_schema.py, docs/lora.md.
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # QLoRA: the frozen base quantized to 4 bits (CUDA only; needs adapter.type=lora).
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)

    def validate(self, key: str) -> None:
        check_choices(self, key)
        check_positive(f"{key}.gradient_checkpointing_every", self.gradient_checkpointing_every)
        self.adapter.validate(f"{key}.adapter")
        self.quantization.validate(f"{key}.quantization")
        if self.quantization.enabled and not self.adapter.enabled:
            raise ConfigError(
                f"{key}.quantization.bits: a quantized base cannot be trained in full; set {key}.adapter.type=lora "
                "(QLoRA) or remove the quantization"
            )
        if self.compile and self.adapter.enabled:  # model.quantization needs an adapter: refused with it
            raise ConfigError(
                f"{key}.compile: not with {key}.adapter.type={self.adapter.type} (under ZeRO-3 the backward pass of "
                "compiled LoRA layers fails on an empty, partitioned tensor); set one of them off"
            )
        if self.quantization.enabled and self.gguf_file:
            raise ConfigError(
                f"{key}.quantization: not with {key}.gguf_file (a GGUF model is loaded dequantized)"
            )


# --------------------------------------------------------------------------------------------------- train

# Optimizer steps of a run that sets neither train.max_steps nor train.num_epochs.
DEFAULT_MAX_STEPS = 1000


@dataclass
class EarlyStoppingConfig:
    """Stop when an eval metric has not improved for `patience` evaluations in a row (ift_dist/early_stopping.py,
    docs/training.md). Evaluated at every train.eval_every; the stop ends the run like its last step (exit code 0)."""

    # The metric watched: "eval_loss" (or "eval_perplexity"; needs data.eval_sources or data.eval_fraction), or a
    # key eval.benchmarks write, "eval/<benchmark>/acc" (also acc_macro, acc_norm). checkpoint.keep_best follows it too.
    metric: str = "eval_loss"
    # "min" (lower is better), "max", or "auto": min for a loss or perplexity, max for an accuracy.
    mode: MetricMode = MetricMode.auto
    # Evaluations in a row without improvement that stop the run; 0 = early stopping off.
    patience: int = 0
    # An improvement must beat the best value by more than this (in the metric's units), as HF's
    # early_stopping_threshold.
    min_delta: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    def resolved_mode(self) -> MetricMode:
        """min or max: `mode`, or the direction the metric's name implies (ConfigError when it implies none)."""
        if self.mode != MetricMode.auto:
            return self.mode
        name = self.metric.rsplit("/", 1)[-1]
        if "loss" in name or "perplexity" in name:
            return MetricMode.min
        if name.startswith("acc"):
            return MetricMode.max
        raise ConfigError(
            f"train.early_stopping.mode: 'auto' cannot tell whether {self.metric!r} is better low or high; "
            "set 'min' or 'max'"
        )

    def validate(self, key: str) -> None:
        check_choices(self, key)
        if self.metric not in ("eval_loss", "eval_perplexity") and not re.fullmatch(
            r"eval/[^/]+/\w+", self.metric
        ):
            raise ConfigError(
                f"{key}.metric: 'eval_loss', 'eval_perplexity' or 'eval/<benchmark>/acc' (a key eval.benchmarks "
                f"write), got {self.metric!r}"
            )
        check_positive(f"{key}.patience", self.patience, allow_zero=True)
        check_positive(f"{key}.min_delta", self.min_delta, allow_zero=True)
        self.resolved_mode()


@dataclass
class TrainConfig:
    """The optimisation: batch geometry, AdamW, LR schedule, loss path, NaN policy, eval and sample cadence.

    Batch arithmetic (docs/training.md): a row is one packed row of at most data.max_length tokens. One optimizer
    step consumes global_batch_rows rows = micro_batch_rows x world size x accumulation steps."""

    # Optimizer steps to run; one step = one global batch. Skipped (non-finite) steps count too. 0 = derived from
    # num_epochs, or 1000 when neither is set. Not together with num_epochs.
    max_steps: int = 0
    # Passes over the training data instead of max_steps (fractions allowed, 1.5); 0 = max_steps decides. The step
    # count is ceil(num_epochs x ceil(packed rows per epoch / global_batch_rows)), as HF Trainer's, counted from the
    # data before the first step and logged (ift_dist/data/epochs.py, docs/training.md).
    num_epochs: float = 0.0
    # Packed rows per optimizer step, summed over all ranks. Set this or global_batch_tokens (not both; neither =
    # micro_batch_rows x world size, no accumulation). Must be a multiple of micro_batch_rows x world size; the
    # quotient is the number of gradient accumulation steps.
    global_batch_rows: int | None = None
    # The global batch in tokens of row capacity: global_batch_rows = global_batch_tokens / data.max_length (must
    # divide). Real tokens per step are fewer by the packing efficiency (logged each step).
    global_batch_tokens: int | None = None
    # Rows per rank in one forward/backward pass (the micro batch).
    micro_batch_rows: int = 1
    # Rows per rank in one evaluation forward pass; null = micro_batch_rows.
    eval_batch_rows: int | None = None
    # Peak learning rate of AdamW.
    learning_rate: float = 2e-5
    # After warmup: "cosine" or "linear" decay to min_lr_ratio x learning_rate at max_steps, or "constant".
    lr_schedule: LrSchedule = LrSchedule.cosine
    # Steps of linear warmup: step s < warmup_steps uses learning_rate x (s + 1) / warmup_steps.
    warmup_steps: int = 0
    # Final learning rate of the cosine/linear decay, as a fraction of learning_rate (0.1 = 10%).
    min_lr_ratio: float = 0.0
    # AdamW decoupled weight decay of matrices; parameters of fewer than 2 dimensions (norms, biases) get none.
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    # Clip the global gradient 2-norm to this before the update (0 = no clipping).
    max_grad_norm: float = 1.0
    # "fused": hidden states -> fused linear cross-entropy (ift_dist.kernels), never holding the full-vocabulary
    # logits; "reference": the model's own logits -> torch cross-entropy (the executable specification).
    loss: LossMode = LossMode.fused
    # How the fused loss accumulates the output layer's gradient (docs/kernels.md): "auto" (exact fp32 accumulation:
    # "vocab" for bf16/fp16 weights, 4 logits-sized matmuls; "rows" for fp32), "rows_inplace" (3 matmuls, one
    # rounding per row chunk, as Liger), "rows" (3 matmuls, an fp32 [V, H] buffer), "vocab".
    fused_loss_dw: WeightGradPass = WeightGradPass.auto
    # Evaluate every N optimizer steps (0 = only at the end): the eval loss (needs data.eval_sources or
    # data.eval_fraction) and eval.benchmarks; with neither there is no evaluation.
    eval_every: int = 0
    # Non-finite (NaN/inf) loss or gradient norm: the step is skipped; this many skipped steps in a row stop the run
    # with exit code 3.
    max_bad_steps: int = 5
    # DeepSpeed JSON holding ZeRO knobs only (configs/ds_zero3/); null = plain ZeRO stage 3. Batch sizes, clipping,
    # precision, optimizer and schedule come from this config; a JSON that sets them is rejected.
    zero_config: str | None = None
    # On ONE rank without parameter offload: "persist" keeps every parameter gathered (DeepSpeed's
    # stage3_param_persistence_threshold set to the maximum: nothing to gather or release per layer, the same
    # numerics, the same ZeRO-3 checkpoints; a threshold in zero_config is overridden); "zero3" leaves zero_config's
    # and DeepSpeed's settings. No effect on several ranks, with offload_param or stage3_allgather_sequential.
    zero_single_rank: ZeroSingleRank = ZeroSingleRank.persist
    # Save a checkpoint into <output_dir>/checkpoints/step_<N> when training ends (docs/checkpoints.md); the
    # periodic and on-signal saves are set in the `checkpoint` section.
    save_at_end: bool = True
    # Prompts (user messages) answered before and after training (decoded as train.sampling says: greedy by
    # default), through the run's chat template; printed on rank 0 and written to <output_dir>/samples.jsonl.
    sample_prompts: list[str] = field(default_factory=list)
    # More sample prompts from a file, after those above: .txt (one prompt a line) or JSONL/JSON of {"prompt"},
    # OpenAI {"messages"} or Alpaca {"instruction", "input"?} records, one user turn each (docs/training.md).
    sample_prompts_file: str | None = None
    # Most new tokens of each sample answer (train.sampling.max_new_tokens, when set, overrides it).
    sample_max_new_tokens: int = 64
    # How the sample answers are decoded: temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed.
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    # Stop when an eval metric stops improving (off by default).
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    @property
    def step_limit(self) -> int | None:
        """The step count the config fixes: max_steps, DEFAULT_MAX_STEPS when neither max_steps nor num_epochs is
        set, None when num_epochs decides (the data then counts it: ift_dist.data.epochs)."""
        if self.num_epochs > 0:
            return None
        return self.max_steps or DEFAULT_MAX_STEPS

    def validate(self, key: str) -> None:
        check_choices(self, key)
        check_positive(f"{key}.max_steps", self.max_steps, allow_zero=True)
        check_positive(f"{key}.num_epochs", self.num_epochs, allow_zero=True)
        if self.max_steps and self.num_epochs:
            raise ConfigError(
                f"{key}.max_steps and {key}.num_epochs are both set ({self.max_steps} steps, {self.num_epochs:g} "
                "epochs): set one of them"
            )
        self.early_stopping.validate(f"{key}.early_stopping")
        if self.global_batch_rows is not None and self.global_batch_tokens is not None:
            raise ConfigError(f"{key}.global_batch_rows: set it or {key}.global_batch_tokens, not both")
        for name in ("global_batch_rows", "global_batch_tokens", "eval_batch_rows"):
            if getattr(self, name) is not None:
                check_positive(f"{key}.{name}", getattr(self, name))
        check_positive(f"{key}.micro_batch_rows", self.micro_batch_rows)
        check_positive(f"{key}.learning_rate", self.learning_rate)
        check_positive(f"{key}.warmup_steps", self.warmup_steps, allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{key}.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        check_positive(f"{key}.weight_decay", self.weight_decay, allow_zero=True)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{key}.{name}: must be in [0, 1), got {getattr(self, name)}")
        check_positive(f"{key}.adam_epsilon", self.adam_epsilon)
        check_positive(f"{key}.max_grad_norm", self.max_grad_norm, allow_zero=True)
        check_positive(f"{key}.eval_every", self.eval_every, allow_zero=True)
        check_positive(f"{key}.max_bad_steps", self.max_bad_steps)
        check_positive(f"{key}.sample_max_new_tokens", self.sample_max_new_tokens)
        self.sampling.validate(f"{key}.sampling")


@dataclass
class WandbConfig:
    """Weights & Biases tracking (rank 0 only). The run id is kept in <output_dir>/wandb_run_id, so a run resumed
    from a checkpoint in the same output_dir continues the same W&B run; a start from step 0 is a new W&B run."""

    # "online", "offline" (written under <output_dir>/wandb/, sync later with `wandb sync`) or "disabled".
    mode: WandbMode = WandbMode.disabled
    project: str = "ift-dist"
    # Team or user; null = the logged-in user's default.
    entity: str | None = None
    # Display name; null = the name of output_dir.
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    # On a resume from step N, rewind the W&B run to step N (wandb.init resume_from), so that the steps after N it
    # has from the interrupted attempt are replaced; false = keep them, and W&B drops the repeated steps. A server
    # without rewind falls back to false with a warning; offline, `wandb sync` does the rewind (docs/training.md).
    rewind_on_resume: bool = True

    def validate(self, key: str) -> None:
        check_choices(self, key)


@dataclass
class TrackingConfig:
    """Where metrics go besides <output_dir>/metrics.jsonl (always written)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Peak dense TFLOP/s of one GPU in the training dtype, for MFU; 0 = look the GPU up by name (H100, A100, ...).
    peak_tflops: float = 0.0

    def validate(self, key: str) -> None:
        self.wandb.validate(f"{key}.wandb")
        check_positive(f"{key}.peak_tflops", self.peak_tflops, allow_zero=True)


# --------------------------------------------------------------------------------------------------- checkpoint


@dataclass
class CheckpointConfig:
    """When checkpoints are saved and kept, and how a run resumes (docs/checkpoints.md). A checkpoint is
    <output_dir>/checkpoints/step_<N>/; train.save_at_end saves one when training ends."""

    # Save every N optimizer steps (0 = not by step count).
    every_steps: int = 0
    # Save when this many minutes have passed since the last save (or the start); 0 = not by time. Checked at every
    # step boundary; the ranks agree (the largest elapsed time counts).
    every_minutes: float = 30.0
    # Keep the newest K complete checkpoints (0 = keep all). Older ones are deleted after a save completes.
    keep_last: int = 2
    # Also keep every checkpoint whose step is a multiple of J, whatever keep_last says (0 = none).
    keep_every: int = 0
    # Keep the checkpoint of the best value of train.early_stopping.metric (eval_loss unless set) whatever keep_last
    # says, name it in checkpoints/best, and export it at the end instead of the last step. A checkpoint is saved at
    # every evaluation that improves the best value; needs train.eval_every > 0.
    keep_best: bool = False
    # "auto": resume from the newest complete checkpoint of <output_dir>/checkpoints, if any (a checkpoint without
    # its completion marker, or with a file missing, truncated or corrupted, is skipped with a warning); "never":
    # start from the pretrained model even if checkpoints exist; or a path: a step_<N> directory, a checkpoints
    # directory or a run directory (its newest complete checkpoint), which must exist and be complete.
    resume: str = "auto"
    # Resume although keys that change the run (model, data, sequence length, seed, optimisation) differ from the
    # checkpoint's config. Without it such a resume is refused with the list of keys.
    force_resume: bool = False
    # Record the SHA-256 of every file in the completion marker and check it on resume (a corrupted shard is found
    # and skipped); false = sizes only (faster for very large checkpoints on slow disks).
    checksums: bool = True
    # A save that fails (disk full, permission denied, on any rank): "stop" the run (exit code 1) or "continue"
    # training, with an error in the log. The previous checkpoint is never touched either way.
    on_save_error: OnSaveError = OnSaveError.stop
    # Wall-clock deadline: save and exit with code 85 (requeue) early enough before it. An ISO time
    # ("2025-01-31T18:00:00", local time unless it has an offset), Unix seconds, "slurm" (the job's end time from
    # SLURM_JOB_END_TIME or squeue), or null (none). A stop signal (SIGTERM, SIGUSR1) does the same at any time.
    deadline: str | None = None
    # Seconds kept free before the deadline besides one step and the measured duration of the last save; it must
    # cover the first save, whose duration is not known yet.
    deadline_margin_seconds: float = 300.0

    def validate(self, key: str) -> None:
        check_choices(self, key)
        for name in ("every_steps", "every_minutes", "keep_last", "keep_every", "deadline_margin_seconds"):
            check_positive(f"{key}.{name}", getattr(self, name), allow_zero=True)
        if not self.resume:
            raise ConfigError(f"{key}.resume: 'auto', 'never' or a path, got {self.resume!r}")


@dataclass
class ExportConfig:
    """The Hugging Face model directory written from the final checkpoint when training ends (`ift export` writes
    one from any checkpoint). docs/checkpoints.md."""

    # Export when training ends (needs train.save_at_end: the export reads the final checkpoint).
    at_end: bool = True
    # Where; null = <output_dir>/hf_model.
    dir: str | None = None
    # Largest safetensors file, e.g. "5GB", "500MB" (powers of 1000, as Hugging Face uses); a parameter larger
    # than this gets a file of its own.
    max_shard_size: str = "5GB"
    # Weight dtype of the export: "auto" = the training dtype (model.dtype resolved; an adapter: float32), or float32,
    # bfloat16, float16.
    dtype: DType = DType.auto
    # Adapter runs (model.adapter): export the base model with the adapter merged in, instead of the peft adapter
    # directory (`ift export --merge` does the same from any checkpoint).
    merge: bool = False

    def validate(self, key: str) -> None:
        check_choices(self, key)
        if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMG]i?B|B)?\s*", self.max_shard_size, flags=re.IGNORECASE):
            raise ConfigError(
                f"{key}.max_shard_size: expected a size like '5GB' or '500MB', got {self.max_shard_size!r}"
            )


# --------------------------------------------------------------------------------------------------- run


@dataclass
class Config:
    """A whole run."""

    # Where the run writes everything: config.yaml, metrics.jsonl, checkpoints, exports.
    output_dir: str = "runs/default"
    # Global seed; data.seed defaults to it when left at 0.
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.tracking.validate("tracking")
        self.checkpoint.validate("checkpoint")
        self.export.validate("export")
        self.eval.validate("eval")
        self._check_watched_metric()
        tokens = self.train.global_batch_tokens
        if tokens is not None and tokens % self.data.max_length:
            raise ConfigError(
                f"train.global_batch_tokens: {tokens} is not a multiple of data.max_length "
                f"({self.data.max_length}); one row holds data.max_length tokens"
            )

    def _check_watched_metric(self) -> None:
        """train.early_stopping and checkpoint.keep_best need evaluations that produce their metric."""
        stopping = self.train.early_stopping
        users = [key for key, on in (("train.early_stopping.patience", stopping.enabled),
                                     ("checkpoint.keep_best", self.checkpoint.keep_best)) if on]  # fmt: skip
        if not users:
            return
        if not self.train.eval_every:
            raise ConfigError(
                f"{users[0]}: needs train.eval_every > 0 (the metric is compared at each evaluation)"
            )
        if stopping.metric in ("eval_loss", "eval_perplexity"):
            if not (self.data.eval_sources or self.data.eval_fraction > 0):
                raise ConfigError(
                    f"{users[0]}: train.early_stopping.metric {stopping.metric!r} needs an eval split "
                    "(data.eval_sources or data.eval_fraction)"
                )
            return
        labels = [benchmark_label(benchmark) for benchmark in self.eval.benchmarks]
        if stopping.metric.split("/")[1] not in labels:
            raise ConfigError(
                f"train.early_stopping.metric: {stopping.metric!r} names no benchmark of eval.benchmarks "
                f"({', '.join(labels) or 'none configured'})"
            )

    @property
    def tokenizer_path(self) -> str:
        """data.tokenizer, else the model's own."""
        path = self.data.tokenizer or self.model.name_or_path
        if not path:
            raise ConfigError(
                "data.tokenizer: set it (or model.name_or_path) to a tokenizer directory or hub id"
            )
        return path

    def batch_plan(self, world_size: int) -> BatchPlan:
        """The batch geometry on `world_size` ranks; ConfigError names the key when it does not divide evenly."""
        return batch_plan(self.train, self.data.max_length, world_size)
