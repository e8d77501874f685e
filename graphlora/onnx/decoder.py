"""A causal LM as an ONNX decoder step with a KV cache: the layout onnxruntime-genai and optimum run.

One graph serves both the prompt and every new token::

    inputs   input_ids        (batch, sequence)                                   int64
             attention_mask   (batch, total_sequence_length)                      int64
             position_ids     (batch, sequence)                                   int64
             past_key_values.{i}.key / .value
                              (batch, kv_heads, past_sequence_length, head_dim)   float
    outputs  logits           (batch, sequence, vocab)
             present.{i}.key / .value
                              (batch, kv_heads, total_sequence_length, head_dim)

``total_sequence_length = past_sequence_length + sequence``; the prompt runs with a past of
length 0. Why a graph of its own: the model's graphs take transformers' static cache (updated in
place, :mod:`graphlora.kv_cache`), which a deployed decoder cannot grow, and a cache *object*,
which ONNX cannot take. So a view of the model's weightless template gets a ``forward`` over
tensors -- a ``DynamicCache`` is built from the past inside the trace and its concatenated
tensors are returned -- and :meth:`graphlora.call_graphs.CallGraphs.derived_graph` traces it and
runs the model's own passes (LoRA branches, quantized weights), so the step holds exactly the
model's weights. The rest is :func:`graphlora.onnx.export.export_graph`, as for any export: LoRA
merged / branch / inputs, int4/int8/nf4 bases. Attention is plain ONNX (what the exporter makes
of the model's attention), which every onnxruntime build runs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from graphlora.errors import ExportError

__all__ = ["DecoderLayout", "decoder_layout", "decoder_step", "is_causal_lm"]

# example sizes of the trace: none 0 or 1, so none is specialised; all distinct, so none is tied
_BATCH, _SEQUENCE, _PAST = 2, 3, 5


class DecoderLayout:
    """The cache geometry of a causal LM: layers, key/value heads, head dimension, vocabulary."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, vocab: int) -> None:
        self.layers, self.kv_heads, self.head_dim, self.vocab = layers, kv_heads, head_dim, vocab

    @property
    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", "position_ids"]
        for i in range(self.layers):
            names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        return names

    @property
    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in range(self.layers):
            names += [f"present.{i}.key", f"present.{i}.value"]
        return names


def is_causal_lm(model: Any) -> bool:
    """Whether ``model`` is a LoraModel of a transformers decoder-only model that generates."""
    from graphlora.generation import generation_mixin
    from graphlora.model import LoraModel

    if not isinstance(model, LoraModel):
        return False
    template = model._calls.template
    config = getattr(template, "config", None)
    return (template is not None and generation_mixin(type(template)) is not None and config is not None
            and not getattr(config, "is_encoder_decoder", False))


def decoder_layout(config: Any) -> DecoderLayout:
    """The cache geometry from a transformers config (its text config)."""
    from graphlora.kv_cache import _attention_shape

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    vocab = getattr(text, "vocab_size", None)
    if not layers or not vocab:
        raise ExportError(f"{type(config).__name__} does not say the model's layers and vocabulary: "
                          "cannot lay out a KV-cache decoder for it")
    kv_heads, head_dim = _attention_shape(config)
    return DecoderLayout(int(layers), kv_heads, head_dim, int(vocab))


def _step_module(template: nn.Module) -> nn.Module:
    """A view of ``template`` (same submodules, same tensor names) whose ``forward`` is one
    decoder step over tensors."""
    base = type(template)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        for i, (key, value) in enumerate(past_key_values):
            cache.update(key, value, i)
        out = base.forward(self, input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids, past_key_values=cache, use_cache=True,
                           return_dict=True)
        present = tuple((layer.keys, layer.values) for layer in out.past_key_values.layers)
        return out.logits, present

    step = copy.copy(template)  # shares _modules, _parameters, _buffers: names are the template's
    step.__class__ = type(f"{base.__name__}DecoderStep", (base,), {"forward": forward})
    return step


def _example(layout: DecoderLayout, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    past = tuple(
        tuple(torch.zeros(_BATCH, layout.kv_heads, _PAST, layout.head_dim, dtype=dtype, device=device)
              for _ in range(2))
        for _ in range(layout.layers)
    )
    return {
        "input_ids": torch.ones(_BATCH, _SEQUENCE, dtype=torch.long, device=device),
        "attention_mask": torch.ones(_BATCH, _PAST + _SEQUENCE, dtype=torch.long, device=device),
        "position_ids": torch.arange(_PAST, _PAST + _SEQUENCE, device=device).expand(_BATCH, _SEQUENCE).contiguous(),
        "past_key_values": past,
    }


def _dynamic_shapes(layout: DecoderLayout) -> dict[str, Any]:
    auto = torch.export.Dim.AUTO
    cache = {0: auto, 2: auto}
    return {
        "input_ids": {0: auto, 1: auto},
        "attention_mask": {0: auto, 1: auto},
        "position_ids": {0: auto, 1: auto},
        "past_key_values": tuple((dict(cache), dict(cache)) for _ in range(layout.layers)),
    }


def _name_io(layout: DecoderLayout):
    """Rename the exporter's flattened inputs/outputs and dims to the genai/optimum layout."""

    def name(onnx_model) -> None:
        import onnx_ir as ir

        graph = onnx_model.graph
        sym = ir.SymbolicDim
        cache_in = ir.Shape([sym("batch"), layout.kv_heads, sym("past_sequence_length"), layout.head_dim])
        cache_out = ir.Shape([sym("batch"), layout.kv_heads, sym("total_sequence_length"), layout.head_dim])
        shapes_in = [ir.Shape([sym("batch"), sym("sequence")]),
                     ir.Shape([sym("batch"), sym("total_sequence_length")]),
                     ir.Shape([sym("batch"), sym("sequence")])] + [cache_in] * (2 * layout.layers)
        shapes_out = [ir.Shape([sym("batch"), sym("sequence"), layout.vocab])] + [cache_out] * (2 * layout.layers)
        inputs = [v for v in graph.inputs if not v.is_initializer()]
        if len(inputs) != len(shapes_in) or len(graph.outputs) != len(shapes_out):
            raise ExportError(f"the decoder step exported {len(inputs)} inputs and {len(graph.outputs)} "
                              f"outputs, expected {len(shapes_in)} and {len(shapes_out)}")
        for value, new, shape in zip(inputs, layout.input_names, shapes_in):
            value.name, value.shape = new, shape
        for value, new, shape in zip(graph.outputs, layout.output_names, shapes_out):
            if value.is_graph_input() or value.is_initializer():
                raise ExportError(f"the decoder step's output {new} is one of its inputs")
            value.name, value.shape = new, shape

    return name


def decoder_step(model: Any) -> tuple[Any, tuple, tuple, Any]:
    """A causal-LM :class:`~graphlora.LoraModel`'s decoder step for the export pipeline
    (:func:`graphlora.onnx.export.export_graph`): its graph (the model's passes applied), example
    arguments, dynamic shapes and the function naming the ONNX inputs and outputs."""
    if not is_causal_lm(model):
        raise ExportError(f"a KV-cache decoder export needs a LoraModel of a transformers causal LM, "
                          f"got {type(model).__name__}")
    layout = decoder_layout(model.config)
    example = _example(layout, model.dtype, model.device)
    step = _step_module(model._calls.template)
    try:
        gm = model._calls.derived_graph(step, example, "the ONNX decoder step (KV cache as tensors)")
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ExportError(f"cannot trace {type(model._calls.template).__name__} as a decoder step with a "
                          f"KV cache: {type(exc).__name__}: {first}") from exc
    args = (example["input_ids"], example["attention_mask"], example["position_ids"], example["past_key_values"])
    return gm, args, tuple(_dynamic_shapes(layout).values()), _name_io(layout)
