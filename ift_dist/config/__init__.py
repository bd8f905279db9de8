"""The typed run configuration, the one door to it: `from ift_dist.config import Config, load_config, DType, ...`.

choices.py  the str-Enums of every closed set of values          checks.py  ConfigError and the shared value checks
schema.py   Config and its sections; derived values              data_schema.py  the data section (TemplateSpec too)
batch.py    the batch geometry (BatchPlan)                       load.py    YAML + overrides -> validated Config, save
paths.py    the paths a config names, checked before any rank starts
eval_schema.py  the eval section (BenchmarkConfig: one multiple-choice benchmark)
quality_schema.py  data.quality: dedup, decontamination, filters, model score, balance
adapter_schema.py  model.adapter (LoRA) and model.quantization (QLoRA)
sampling_schema.py  train.sampling: how the sample prompts' answers are decoded
"""

from ift_dist.config.adapter_schema import ALL_LINEAR, AdapterConfig, AdapterType, QuantizationConfig
from ift_dist.config.batch import BatchPlan, batch_plan
from ift_dist.config.checks import ConfigError
from ift_dist.config.choices import (
    AttentionBackend,
    Choice,
    DType,
    LossMode,
    LrSchedule,
    McScoring,
    MetricMode,
    OnBadRecord,
    OnSaveError,
    Overlong,
    PromptFormat,
    RecordFormat,
    SourceRole,
    Supervise,
    Template,
    ToolFallback,
    WandbMode,
)
from ift_dist.config.data_schema import (
    TEMPLATE_PLACEHOLDERS,
    TEMPLATE_TOKENS,
    DataConfig,
    SourceConfig,
    TemplateSpec,
)
from ift_dist.config.eval_schema import BENCHMARK_NAMES, BenchmarkConfig, EvalConfig, benchmark_label
from ift_dist.config.load import check_keys, load_config, save_config, schema_key, to_dict, to_yaml
from ift_dist.config.paths import check_paths, relative_path_note
from ift_dist.config.quality_schema import (
    BalanceConfig,
    DecontamConfig,
    DecontamMethod,
    DedupConfig,
    DedupKey,
    FilterConfig,
    ModelScoreConfig,
    QualityConfig,
)
from ift_dist.config.schema import (
    CheckpointConfig,
    Config,
    EarlyStoppingConfig,
    ExportConfig,
    ModelConfig,
    TrackingConfig,
    TrainConfig,
    WandbConfig,
)

__all__ = [
    "ALL_LINEAR",
    "BENCHMARK_NAMES",
    "TEMPLATE_PLACEHOLDERS",
    "TEMPLATE_TOKENS",
    "AdapterConfig",
    "AdapterType",
    "AttentionBackend",
    "BalanceConfig",
    "BatchPlan",
    "BenchmarkConfig",
    "CheckpointConfig",
    "Choice",
    "Config",
    "ConfigError",
    "DType",
    "DataConfig",
    "DecontamConfig",
    "DecontamMethod",
    "DedupConfig",
    "DedupKey",
    "EarlyStoppingConfig",
    "EvalConfig",
    "ExportConfig",
    "FilterConfig",
    "LossMode",
    "LrSchedule",
    "McScoring",
    "MetricMode",
    "ModelConfig",
    "ModelScoreConfig",
    "OnBadRecord",
    "OnSaveError",
    "Overlong",
    "PromptFormat",
    "QualityConfig",
    "QuantizationConfig",
    "RecordFormat",
    "SourceConfig",
    "SourceRole",
    "Supervise",
    "Template",
    "TemplateSpec",
    "ToolFallback",
    "TrackingConfig",
    "TrainConfig",
    "WandbConfig",
    "WandbMode",
    "batch_plan",
    "benchmark_label",
    "check_keys",
    "check_paths",
    "load_config",
    "relative_path_note",
    "save_config",
    "schema_key",
    "to_dict",
    "to_yaml",
]
