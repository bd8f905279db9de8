"""One rank with train.zero_single_rank=persist (every parameter kept gathered) trains exactly as plain ZeRO-3 on one
rank, and writes the same ZeRO-3 checkpoint (weights and optimizer state bitwise): resumed on 2 ranks (DeepSpeed's
universal checkpoint), it continues the same training. Real `deepspeed` processes on CPU, gloo, fp32, prepared
rows (checkpoint_runs.prepared_overrides: a step is the same 6 rows on any number of ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from checkpoint_runs import assert_same_steps, cut_back, prepared_overrides
from dist_helpers import HANG_TIMEOUT, REPO, check, launch

pytestmark = [pytest.mark.dist, pytest.mark.slow]

PERSIST_LOG = "one rank: every parameter stays gathered, no per-layer gather/release"

# One process builds the engine of a run's config.yaml as train.py does and takes 4 micro batches through
# engine_lib.backward_step (DeepSpeed records its fetch trace in the first two): the ZeRO-3 status of every
# parameter after the last one's backward, and how often DeepSpeed partitioned a parameter during that micro batch.
PROBE = """
import collections, json, sys
from pathlib import Path
import torch
from ift_dist import dist, engine as engine_lib
from ift_dist.config import batch_plan, load_config
from ift_dist.loss import CausalLMLoss
from ift_dist.model import load_adapted_model, resolve_dtype
from ift_dist.optim import parameter_groups

dist.set_single_process_defaults()
run_dir = Path(sys.argv[1])
cfg = load_config(run_dir / "config.yaml", [f"output_dir={run_dir}"])
plan = batch_plan(cfg.train, cfg.data.max_length, 1)
zero = engine_lib.load_zero_config(cfg.train.zero_config)
ds_config = engine_lib.build_config(zero, plan, cfg.train, resolve_dtype(cfg.model.dtype, dist.device()))
engine_lib.init_distributed()
model, _, _ = load_adapted_model(cfg.model, seed=0, init_context=engine_lib.zero3_init(ds_config))
model.set_attn_implementation("sdpa")  # plain causal rows
module = CausalLMLoss(model, cfg.train.loss)
optimizer = engine_lib.build_optimizer(parameter_groups(module.named_parameters(), 0.0), cfg.train, ds_config)
engine = engine_lib.initialize(module, optimizer, ds_config)
engine.train()
tokens = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2, 198]])
partitions = collections.Counter()
for micro in range(4):
    if micro == 3:
        for parameter in model.parameters():
            original = parameter.partition
            def counting(*args, _original=original, **kwargs):
                partitions["calls"] += 1
                return _original(*args, **kwargs)
            parameter.partition = counting
    engine_lib.backward_step(engine, engine(labels=tokens, input_ids=tokens) / tokens.numel())
status = collections.Counter(str(p.ds_status).split(".")[-1] for p in model.parameters())
persistent = sum(bool(p.ds_persist) for p in model.parameters())
print(json.dumps({"status": status, "persistent": persistent, "partitions": partitions["calls"]}))
dist.shutdown(together=True)
"""


@pytest.fixture(scope="module")
def overrides(tiny_model, prepared_data) -> list[str]:
    """3 steps, a checkpoint after step 2, no export or sample prompts (nothing but the training is compared)."""
    shared = [
        o for o in prepared_overrides(tiny_model, prepared_data) if not o.startswith("train.max_steps=")
    ]
    return [*shared, "train.max_steps=3", "export.at_end=false"]


@pytest.fixture(scope="module")
def modes(dist_dir) -> dict[str, list[str]]:
    """persist; and ZeRO-3 with no parameter persistent at all. The tiny model's matrices are all under DeepSpeed's
    default persistence threshold (1e5 elements), so plain ZeRO-3 would release only the embedding here: threshold
    0 makes every layer gather and release all its parameters, the path farthest from persist."""
    nothing_persists = dist_dir / "zero3-no-persistence.json"
    zero = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    nothing_persists.write_text(json.dumps(zero))
    return {
        "persist": ["train.zero_single_rank=persist"],
        "zero3": ["train.zero_single_rank=zero3", f"train.zero_config={nothing_persists}"],
    }


@pytest.fixture(scope="module")
def runs(dist_dir, overrides, modes) -> dict[str, object]:
    """The same 3 steps on one rank in both modes."""
    return {
        mode: check(launch(dist_dir / f"single-{mode}", [*overrides, *extra], ranks=1))
        for mode, extra in modes.items()
    }


def probe(run) -> dict:
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(run.output_dir)],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-10000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_persist_keeps_every_parameter_gathered(runs):
    """persist: every parameter persistent and still available after a micro batch, none partitioned during it;
    zero3 (nothing persistent): every parameter released after its layer, each partitioned at least once."""
    persist, zero3 = probe(runs["persist"]), probe(runs["zero3"])
    parameters = sum(persist["status"].values())
    assert persist == {"status": {"AVAILABLE": parameters}, "persistent": parameters, "partitions": 0}
    assert zero3["status"] == {"NOT_AVAILABLE": parameters} and zero3["persistent"] == 0
    assert zero3["partitions"] >= parameters


def test_persistent_parameters_train_exactly_as_zero3(runs):
    persist, zero3 = runs["persist"], runs["zero3"]
    assert PERSIST_LOG in persist.output and PERSIST_LOG not in zero3.output
    ours, theirs = persist.train_records(), zero3.train_records()
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [1, 2, 3]
    # Bitwise: the same tensors, only how long they stay gathered differs.
    for mine, yours in zip(ours, theirs, strict=True):
        assert (mine["loss"], mine["grad_norm"]) == (yours["loss"], yours["grad_norm"]), mine["step"]
    # The checkpoints hold the same files and the same fp32 weights.
    persisted, plain = (run.output_dir / "checkpoints" / "step_2" for run in (persist, zero3))
    assert sorted(p.relative_to(persisted) for p in persisted.rglob("*") if p.suffix == ".pt") == sorted(
        p.relative_to(plain) for p in plain.rglob("*") if p.suffix == ".pt"
    )
    from ift_dist.engine import fp32_weights

    weights, other = fp32_weights(persisted), fp32_weights(plain)
    assert weights.keys() == other.keys()
    for name in weights:
        assert torch.equal(weights[name].contiguous(), other[name].contiguous()), name
    # And the same optimizer state (steps, Adam moments), tensor by tensor: a resume reads the same checkpoint.
    optimizer = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    mine, yours = (tensors(torch.load(path / optimizer, map_location="cpu", weights_only=False))
                   for path in (persisted, plain))  # fmt: skip
    assert mine.keys() == yours.keys() and any("exp_avg" in key for key in mine)
    for key in mine:
        assert torch.equal(mine[key], yours[key]), key


def tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested dict/list, by its path."""
    if torch.is_tensor(tree):
        return {prefix: tree}
    items = (
        tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else ()
    )
    return {path: value for key, child in items for path, value in tensors(child, f"{prefix}/{key}").items()}


def test_a_persist_checkpoint_resumes_on_two_ranks(dist_dir, runs, overrides, modes):
    """The persist checkpoint (bitwise the zero3 one, above) converted for 2 ranks continues the same training."""
    run_dir = cut_back(runs["persist"], dist_dir / "single-persist-on-2", 2)
    resumed = check(launch(run_dir, [*overrides, *modes["persist"]], ranks=2))
    assert "the checkpoint was written by 1 ranks, this run has 2: converting" in resumed.output
    assert PERSIST_LOG not in resumed.output  # two ranks: ZeRO-3 as usual
    assert_same_steps(resumed, runs["zero3"], range(1, 4))  # 2 ranks == 1 rank, within 1e-6
