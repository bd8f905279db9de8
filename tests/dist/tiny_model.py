"""A tiny random Llama with SmolLM2's real vocabulary (49,152 tokens, tied embeddings), for CPU training runs.

python tests/dist/tiny_model.py runs/tiny-llama
"""

from __future__ import annotations

import sys
from pathlib import Path

SMOLLM2_VOCAB = 49152


def save_tiny_llama(directory: str | Path, *, tied: bool = True, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=SMOLLM2_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=1,  # SmolLM2: <|im_start|>
        eos_token_id=2,  # <|im_end|>
        pad_token_id=2,
    )
    directory = Path(directory)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


if __name__ == "__main__":
    print(save_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-llama"))
