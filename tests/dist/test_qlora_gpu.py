"""QLoRA on a GPU (marker `gpu`, skipped without CUDA; needs bitsandbytes, the `qlora` extra): a 1B-class random Llama
trained 12 steps on 1 GPU under ZeRO-3 with its base in 4-bit NF4, next to LoRA on the bf16 base and full-parameter
training on the same rows: every run's loss falls, and the peak memory is QLoRA < LoRA < full (printed, for
docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from dist_helpers import check, launch
from tiny_model import save_tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.dist, pytest.mark.slow]

# ~1.1B parameters: Llama-3.2-1B's shape with SmolLM2's vocabulary.
ONE_B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
}
COMMON = [
    "train.max_steps=12",
    "train.global_batch_rows=4",
    "train.micro_batch_rows=4",
    "train.sample_prompts=[]",
    "train.eval_every=0",
    "data.eval_sources=[]",
    "data.max_length=1024",
    "model.dtype=bfloat16",
    "model.gradient_checkpointing=true",
    "export.at_end=false",
    "train.save_at_end=false",
]
LORA = ["model.adapter.type=lora", "model.adapter.target_modules=all-linear", "train.learning_rate=2.0e-4"]


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (ift-dist[qlora])"
)
def test_qlora_trains_and_needs_the_least_memory(tmp_path):
    model = save_tiny_llama(tmp_path / "llama-1b", **ONE_B)
    runs = {
        "full": [*COMMON, f"model.name_or_path={model}", "train.learning_rate=1.0e-4"],
        "lora": [*COMMON, f"model.name_or_path={model}", *LORA],
        "qlora": [*COMMON, f"model.name_or_path={model}", *LORA, "model.quantization.bits=4"],
    }
    peaks = {}
    for name, overrides in runs.items():
        run = check(launch(tmp_path / name, overrides, ranks=1))
        losses = [record["loss"] for record in run.train_records()]
        assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), (name, losses)
        peaks[name] = max(record["memory_gb"] for record in run.train_records())
    print(f"peak GPU memory (GB) on {torch.cuda.get_device_name()}: {peaks}")
    assert peaks["qlora"] < peaks["lora"] < peaks["full"]
