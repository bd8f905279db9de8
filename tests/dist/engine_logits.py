"""The logits of a trained ZeRO-3 engine on one fixed batch, for the export tests: every rank builds the engine of a
run directory's config.yaml as the trainer does (an adapter run's with its LoRA adapter), loads the run's `latest`
checkpoint into it, and runs the HF model (engine.module.model, its parameters gathered by ZeRO-3 layer by layer) on
the tokens; rank 0 saves the logits.

--train-steps N (adapter runs): then N more optimizer steps on the tokens through engine.backward_step, as training
takes them, and every frozen weight gathered afterwards: saved as "frozen" (the test compares them with the base).

    deepspeed --num_gpus 2 tests/dist/engine_logits.py RUN_DIR OUT.pt [--train-steps N]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ift_dist import dist
from ift_dist import engine as engine_lib
from ift_dist.config import batch_plan, load_config
from ift_dist.loss import CausalLMLoss
from ift_dist.model import load_adapted_model, resolve_dtype
from ift_dist.optim import parameter_groups

# Token ids of the tiny model's vocabulary (SmolLM2's), a fixed "batch" of two rows.
TOKENS = torch.tensor(
    [
        [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2, 198],
        [1, 4093, 198, 19556, 17, 30, 2, 198, 1, 520, 9531, 198],
    ]
)


def main(run_dir: Path, out: Path, train_steps: int = 0) -> None:
    dist.set_single_process_defaults()
    cfg = load_config(run_dir / "config.yaml", [f"output_dir={run_dir}"])
    device = dist.device()
    plan = batch_plan(cfg.train, cfg.data.max_length, dist.world_size())
    zero = engine_lib.load_zero_config(cfg.train.zero_config)
    ds_config = engine_lib.build_config(zero, plan, cfg.train, resolve_dtype(cfg.model.dtype, device))
    engine_lib.init_distributed()
    init_context = engine_lib.zero3_init(ds_config)
    model, _, peft_model = load_adapted_model(
        cfg.model, seed=cfg.seed, device=device, init_context=init_context
    )
    module = CausalLMLoss(model, cfg.train.loss)
    groups = parameter_groups(module.named_parameters(), cfg.train.weight_decay)
    optimizer = engine_lib.build_optimizer(groups, cfg.train, ds_config)
    engine = engine_lib.initialize(module, optimizer, ds_config)
    checkpoints = run_dir / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    engine_lib.load_shards(engine, checkpoints, tag, universal=False, frozen_base=peft_model is not None)
    engine.eval()
    model.set_attn_implementation("sdpa")  # plain causal rows, as the exported model runs them
    with torch.no_grad():
        logits = engine.module.model(input_ids=TOKENS.to(device)).logits.float().cpu()
    result = {"tokens": TOKENS, "logits": logits}
    if train_steps:
        result["frozen"] = train_then_gather_frozen(engine, train_steps, plan.accumulation_steps)
    if dist.rank() == 0:
        torch.save(result, out)
    dist.shutdown(together=True)  # every rank got here after the same collectives


def train_then_gather_frozen(engine, steps: int, accumulation_steps: int) -> dict[str, torch.Tensor]:
    """`steps` optimizer steps on TOKENS (every position supervised), then {name: full value} of every parameter
    that does not require grad, gathered from the ZeRO-3 shards."""
    import deepspeed

    engine.train()
    labels = TOKENS.clone()
    for _ in range(steps * accumulation_steps):
        loss = engine(labels=labels, input_ids=TOKENS)
        engine_lib.backward_step(engine, loss / labels.numel())
    frozen = {}
    for name, parameter in engine.module.model.named_parameters():
        if not parameter.requires_grad:
            with deepspeed.zero.GatheredParameters([parameter]):
                frozen[name] = parameter.detach().clone().cpu()
    return frozen


if __name__ == "__main__":
    arguments = [argument for argument in sys.argv[1:] if not argument.startswith("--local_rank")]
    train_steps = 0
    if "--train-steps" in arguments:
        index = arguments.index("--train-steps")
        train_steps = int(arguments[index + 1])
        del arguments[index : index + 2]
    main(Path(arguments[0]), Path(arguments[1]), train_steps)
