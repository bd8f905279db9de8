"""The tiny random Llama of the tests: by default SmolLM2's vocabulary and special tokens (49,152 tokens, tied
embeddings), small enough to train on a CPU; each test overrides the config fields it needs.

python tests/tiny_model.py runs/tiny-llama
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

SMOLLM2_VOCAB = 49152
DEFAULTS: dict[str, Any] = {
    "vocab_size": SMOLLM2_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "bos_token_id": 1,  # SmolLM2: <|im_start|>
    "eos_token_id": 2,  # <|im_end|>
    "pad_token_id": 2,
}


def tiny_llama(*, seed: int | None = 0, **overrides: Any) -> Any:
    """A random LlamaForCausalLM of DEFAULTS updated with `overrides` (LlamaConfig fields), seeded with `seed`
    (None: the global RNG as it is)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**DEFAULTS, **overrides}))


def save_tiny_llama(directory: str | Path, *, tied: bool = True, seed: int = 0, **overrides: Any) -> Path:
    """`tiny_llama` saved as a Hugging Face model directory."""
    directory = Path(directory)
    tiny_llama(seed=seed, tie_word_embeddings=tied, **overrides).save_pretrained(directory)
    return directory


if __name__ == "__main__":
    print(save_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-llama"))
