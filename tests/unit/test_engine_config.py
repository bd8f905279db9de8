"""The DeepSpeed config: the JSON holds ZeRO knobs only (our keys refused, naming the key to use), the rest comes from
our config, and DeepSpeed's own parser accepts the result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig

from ift_dist import engine
from ift_dist.config import ConfigError, TrainConfig, batch_plan
from ift_dist.engine import OWNED_KEYS, build_config, load_zero_config, offloads_optimizer

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "ds_zero3"


def write(tmp_path, content) -> str:
    path = tmp_path / "zero.json"
    path.write_text(json.dumps(content) if not isinstance(content, str) else content)
    return str(path)


def test_shipped_files_hold_zero_knobs_only():
    plain = load_zero_config(REPO_CONFIGS / "zero3.json")
    offload = load_zero_config(REPO_CONFIGS / "zero3_offload.json")
    assert set(plain) == set(offload) == {"zero_optimization"}
    assert plain["zero_optimization"]["stage"] == offload["zero_optimization"]["stage"] == 3
    assert not offloads_optimizer(plain) and offloads_optimizer(offload)
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_no_file_means_plain_stage_3():
    assert load_zero_config(None) == {"zero_optimization": {"stage": 3}}


@pytest.mark.parametrize(
    ("key", "ours"),
    [
        ("train_batch_size", "train.global_batch_rows"),
        ("train_micro_batch_size_per_gpu", "train.micro_batch_rows"),
        ("gradient_accumulation_steps", "train.global_batch_rows"),
        ("gradient_clipping", "train.max_grad_norm"),
        ("bf16", "model.dtype"),
        ("fp16", "model.dtype"),
        ("optimizer", "train.learning_rate"),
        ("scheduler", "train.lr_schedule"),
    ],
)
def test_a_key_we_own_is_refused_naming_ours(tmp_path, key, ours):
    path = write(tmp_path, {"zero_optimization": {"stage": 3}, key: {"enabled": True}})
    with pytest.raises(
        ConfigError, match=rf"^train\.zero_config: .* sets '{key}', which ift-dist sets itself"
    ) as e:
        load_zero_config(path)
    assert ours in str(e.value)
    assert key in OWNED_KEYS


def test_an_unknown_key_is_refused_listing_the_allowed(tmp_path):
    with pytest.raises(
        ConfigError, match=r"'flops_profiler', which is not a ZeRO knob; allowed: zero_optimization"
    ):
        load_zero_config(write(tmp_path, {"flops_profiler": {"enabled": True}}))


def test_only_stage_3(tmp_path):
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage=2; ift-dist trains with ZeRO stage 3"):
        load_zero_config(write(tmp_path, {"zero_optimization": {"stage": 2}}))
    assert load_zero_config(write(tmp_path, {"zero_optimization": {}}))["zero_optimization"]["stage"] == 3


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_zero_config(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match=r"is not valid JSON"):
        load_zero_config(write(tmp_path, "{stage: 3"))
    with pytest.raises(ConfigError, match=r"must hold a JSON object"):
        load_zero_config(write(tmp_path, [1, 2]))


@pytest.mark.parametrize(
    ("dtype", "precision"),
    [
        (torch.bfloat16, {"bf16": {"enabled": True}}),
        (torch.float16, {"fp16": {"enabled": True, "loss_scale": 0}}),
    ],
)
def test_precision_comes_from_the_model_dtype(dtype, precision):
    plan = batch_plan(TrainConfig(global_batch_rows=8), 512, 2)
    config = build_config(load_zero_config(None), plan, TrainConfig(), dtype)
    assert {key: config[key] for key in precision} == precision
    fp32 = build_config(load_zero_config(None), plan, TrainConfig(), torch.float32)
    assert "bf16" not in fp32 and "fp16" not in fp32


def test_batch_geometry_and_clipping_come_from_our_config_and_deepspeed_accepts_them():
    train = TrainConfig(global_batch_tokens=6 * 512, micro_batch_rows=3, max_grad_norm=0.7)
    plan = batch_plan(train, 512, 1)
    zero = load_zero_config(REPO_CONFIGS / "zero3_offload.json")
    before = json.dumps(zero)
    config = build_config(zero, plan, train, torch.float32)
    assert json.dumps(zero) == before  # the ZeRO knobs are copied, not written into
    parsed = DeepSpeedConfig(config)  # world of one: 6 rows = 3 per micro batch x 2 accumulation steps
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu) == (6, 3)
    assert parsed.gradient_accumulation_steps == 2
    assert parsed.gradient_clipping == pytest.approx(0.7)
    assert parsed.zero_optimization_stage == 3
    assert parsed.zero_config.offload_optimizer.device == "cpu"


def test_zero3_loading_without_accelerate_is_an_error(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a),
    )
    with pytest.raises(RuntimeError, match="accelerate"):
        engine.zero3_init({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})


def test_a_model_loaded_whole_is_refused():
    with pytest.raises(RuntimeError, match="loaded whole"):
        engine.check_partitioned(torch.nn.Linear(2, 2))


def test_zero3_init_is_active_only_inside_its_block():
    """from_pretrained partitions only inside the block; models built after it (the export's skeleton) are whole."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    init_context = engine.zero3_init({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert not is_deepspeed_zero3_enabled()
    with init_context():
        assert is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled()
    with pytest.raises(ValueError), init_context():
        assert is_deepspeed_zero3_enabled()
        raise ValueError("a failed load")
    assert not is_deepspeed_zero3_enabled()


def zero_section(zero: dict, world_size: int, **train) -> dict:
    """The zero_optimization section build_config hands DeepSpeed for `zero` on `world_size` ranks."""
    settings = TrainConfig(**train)
    plan = batch_plan(settings, 512, world_size)
    return build_config(zero, plan, settings, torch.float32)["zero_optimization"]


def test_one_rank_keeps_every_parameter_gathered_and_deepspeed_accepts_it():
    section = zero_section({"zero_optimization": {"stage": 3, "overlap_comm": True}}, 1)
    assert section == {"stage": 3, "overlap_comm": True, "stage3_param_persistence_threshold": sys.maxsize}
    plan = batch_plan(TrainConfig(), 512, 1)
    parsed = DeepSpeedConfig(build_config(load_zero_config(None), plan, TrainConfig(), torch.float32))
    assert parsed.zero_config.param_persistence_threshold == sys.maxsize
    assert parsed.zero_config.model_persistence_threshold == sys.maxsize  # no cap on the persisted total
    assert parsed.zero_config.overlap_comm  # prefetch and overlap left to DeepSpeed's stage-3 defaults


def test_zero3_behaviour_is_kept_where_persistence_does_not_apply():
    plain = load_zero_config(None)
    assert zero_section(plain, 2) == plain["zero_optimization"]  # several ranks: untouched
    assert zero_section(plain, 1, zero_single_rank="zero3") == plain["zero_optimization"]
    offload = load_zero_config(REPO_CONFIGS / "zero3_offload.json")  # parameters live on the CPU
    assert zero_section(offload, 1) == offload["zero_optimization"]
    legacy = {"zero_optimization": {"stage": 3, "cpu_offload_param": True}}
    assert zero_section(legacy, 1) == legacy["zero_optimization"]
    sequential = {"zero_optimization": {"stage": 3, "stage3_allgather_sequential": True}}  # gathers copy
    assert zero_section(sequential, 1) == sequential["zero_optimization"]


@pytest.mark.parametrize("key", ["stage3_param_persistence_threshold", "param_persistence_threshold"])
def test_a_persistence_threshold_of_the_json_is_overridden_on_one_rank_only(key):
    zero = {"zero_optimization": {"stage": 3, key: 1000}}
    assert zero_section(zero, 1) == {"stage": 3, "stage3_param_persistence_threshold": sys.maxsize}
    assert zero_section(zero, 2) == zero["zero_optimization"]
    shipped = load_zero_config(REPO_CONFIGS / "zero3.json")  # sets its own threshold (1e6) for many ranks
    assert zero_section(shipped, 1)["stage3_param_persistence_threshold"] == sys.maxsize
    assert zero_section(shipped, 2) == shipped["zero_optimization"]


def test_the_other_knobs_of_the_json_are_kept():
    zero = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 123, "overlap_comm": False}}
    section = zero_section(zero, 1)
    assert section == {**zero["zero_optimization"], "stage3_param_persistence_threshold": sys.maxsize}


def test_changing_zero_single_rank_never_blocks_a_resume():
    from ift_dist.checkpoint.compat import config_changes
    from ift_dist.config import Config, to_dict

    old, new = to_dict(Config()), to_dict(Config())
    new["train"]["zero_single_rank"] = "zero3"
    assert config_changes(old, new) == ([], ["train.zero_single_rank"])
    del old["train"]["zero_single_rank"]  # a checkpoint of a version without the key: persist by default
    assert config_changes(old, to_dict(Config())) == ([], [])
