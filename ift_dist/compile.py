"""Regional torch.compile (model.compile): every decoder layer's forward compiled in place, ZeRO-3 around it.

    load_model (zero.Init, packed attention, checkpointing) -> compile_decoder_layers(model, ds_config)
        -> engine.initialize (ZeRO-3 hooks) -> the first forward pass compiles one graph that every layer reuses

Why the layer's `forward`, not `nn.Module.compile` (which compiles `_call_impl`, hooks included) or DeepSpeed's
`engine.compile` (the whole module): ZeRO-3 puts a parameter fetch before and a release after every submodule's
forward (deepspeed/runtime/zero/parameter_offload.py, `_register_deepspeed_module`), and the fetch is
`@torch.compiler.disable`: traced, each one is a graph break, so a Llama layer would fall apart into one graph per
Linear. Two things keep the ZeRO-3 machinery out of the graph instead:

- each decoder layer is a ZeRO-3 *leaf module* (`zero_optimization.leaf_module.classes`, applied by
  `deepspeed.initialize` through `apply_zero_leaf_module_config`): its hooks go on the layer only, and the
  coordinator fetches all its parameters, recursively, before it runs (`iter_params(..., recurse=z3_leaf_module(...))`
  in partitioned_param_coordinator.py). Inside the layer no hook fires; the gather granularity becomes one layer.
- the layer's `forward` (an instance attribute; `state_dict` keys and checkpoints are unchanged, no `_orig_mod.`)
  is what is compiled, so the layer's own hooks (the gather, the release, the backward-hook autograd Functions)
  run eagerly around the compiled graph, exactly as without compilation.

Only packed forward passes (training, evaluation) run the compiled code; generation, with its KV cache and a new
length every token, runs the same layers eagerly. The layers share their class, hence their code, so dynamo's cache
holds a few graphs for all of them (the first layer builds the packed attention mask that the others read from
`PackedSegments.cache`: 4 graphs for the tiny test Llama). Activation checkpointing wraps the compiled code from
outside (`compiled_forward` says why).
"""

from __future__ import annotations

import functools
import logging
import types
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from ift_dist.attention import PackedSegments
from ift_dist.config import ConfigError

logger = logging.getLogger(__name__)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of `model`, outermost first: transformers' GradientCheckpointingLayer subclasses (every
    decoder layer of transformers >= 4.52), else the classes the model lists in `_no_split_modules`."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [
        module
        for module in model.modules()
        if isinstance(module, GradientCheckpointingLayer) or type(module).__name__ in names
    ]
    # A block nested in another is compiled as part of the outer one.
    nested = {id(inner) for layer in layers for inner in layer.modules() if inner is not layer}
    return [layer for layer in layers if id(layer) not in nested]


def qualified_name(module: torch.nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def make_leaf_modules(ds_config: dict[str, Any], layers: list[torch.nn.Module]) -> list[str]:
    """Mark the classes of `layers` as ZeRO-3 leaf modules in `ds_config` (before deepspeed.initialize reads it),
    keeping any leaf classes the DeepSpeed JSON lists; returns the classes added."""
    added = sorted({qualified_name(layer) for layer in layers})
    leaf = ds_config.setdefault("zero_optimization", {}).setdefault("leaf_module", {})
    classes = leaf.get("classes", [])
    classes = [classes] if isinstance(classes, str) else list(classes)
    leaf["classes"] = [*classes, *(name for name in added if name not in classes)]
    return added


def compile_decoder_layers(model: torch.nn.Module, ds_config: dict[str, Any]) -> list[torch.nn.Module]:
    """Compile every decoder layer of `model` in place and make it a ZeRO-3 leaf module; returns the layers. Call it
    after load_model (attention backend and checkpointing set) and before deepspeed.initialize."""
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(
            f"model.compile: found no decoder layers in {type(model).__name__} (no GradientCheckpointingLayer "
            "and nothing in _no_split_modules); set model.compile=false"
        )
    classes = make_leaf_modules(ds_config, layers)
    for layer in layers:
        layer.forward = compiled_forward(layer)
    logger.info(
        "model.compile: %d decoder layers (%s) compiled one by one, each gathered whole by ZeRO-3 (leaf module); "
        "the first forward pass compiles",
        len(layers),
        ", ".join(name.rsplit(".", 1)[-1] for name in classes),
    )
    return layers


def compiled_forward(layer: torch.nn.Module) -> Callable[..., Any]:
    """`layer`'s forward compiled, with activation checkpointing (when the layer has it on) around the compiled code.

    transformers wraps the class's forward in its checkpointing (GradientCheckpointingLayer.__init_subclass__,
    functools.wraps, so the wrapped forward is `__wrapped__`). Traced, that wrapper makes torch.utils.checkpoint a
    higher-order op whose body may not mutate outside state, and the packed attention functions do (the call counter
    and mask cache of PackedSegments): dynamo gives up the whole layer ("HOP: Unsafe side effect", no graph). So
    the unwrapped forward is compiled and checkpointed from outside, as transformers does it (non-reentrant,
    `layer._gradient_checkpointing_func`, only in training with gradients on)."""
    forward = type(layer).forward
    inner = getattr(forward, "__wrapped__", forward)
    if getattr(layer, "gradient_checkpointing", False) and inner is forward:
        raise ConfigError(
            f"model.compile with model.gradient_checkpointing: {type(layer).__name__}.forward is not transformers' "
            "checkpointing wrapper of the layer's forward, so it cannot be compiled inside the checkpoint; set one "
            "of them to false"
        )
    # One compiled function per layer, one code object for all: dynamo's cache shares the graphs between layers.
    eager = types.MethodType(inner, layer)
    compiled = torch.compile(eager)

    @functools.wraps(inner)
    def forward_checkpointed(*args: Any, **kwargs: Any) -> Any:
        # Packed rows only (training and evaluation: fixed rows, few shapes). Generation (sample prompts, benchmarks:
        # unpacked, a KV cache, a new length every token) runs eagerly: traced, it would use up dynamo's recompile
        # limit on this code, after which the training forward would silently run eagerly too.
        function = compiled if any(isinstance(value, PackedSegments) for value in kwargs.values()) else eager
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            return layer._gradient_checkpointing_func(functools.partial(function, **kwargs), *args)
        return function(*args, **kwargs)

    return forward_checkpointed


def graph_report() -> str:
    """What dynamo has done so far in this process: graphs compiled, graph breaks (with the commonest reasons),
    frames compiled; cheap (torch._dynamo's global counters)."""
    from torch._dynamo.utils import counters

    breaks = Counter({reason: count for reason, count in counters["graph_break"].items()})
    text = (
        f"torch.compile: {counters['stats']['unique_graphs']} graphs, {sum(breaks.values())} graph breaks, "
        f"{counters['frames']['ok']} of {counters['frames']['total']} frames compiled"
    )  # fewer frames compiled than tried: dynamo gave up on a call, which then ran eagerly (its warning says why)
    if breaks:
        text += "; breaks: " + "; ".join(
            f"{count}x {reason[:120]}" for reason, count in breaks.most_common(3)
        )
    return text
