"""ONNX lowering of graphlora models and a small onnxruntime session helper.

* :func:`export_onnx` — a LoraModel as standard ONNX QDQ (opset 21, IR 10): pre-quantized
  integer initializers + ``DequantizeLinear`` for weights, ``QuantizeLinear``/``DequantizeLinear``
  for calibrated activations, onnxruntime's ``MatMulBnb4`` for NF4; LoRA merged, as a branch, or
  as graph inputs switched with onnxruntime adapters (:func:`write_adapter`).
* causal LMs export as a KV-cache decoder step (:mod:`graphlora.onnx.decoder`, the
  onnxruntime-genai/optimum layout); :func:`generate` runs one greedily with plain onnxruntime.
* :class:`InferenceSession` — CUDA when usable else CPU (and why), 4-bit accuracy level, fusion
  blockers disabled.
* :mod:`graphlora.onnx.optimized` — read the graph onnxruntime actually runs.

Submodules are imported lazily, so ``import graphlora.onnx`` does not need onnxruntime.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "export_onnx": "graphlora.onnx.export",
    "OnnxExport": "graphlora.onnx.export",
    "save_model": "graphlora.onnx.export",
    "InferenceSession": "graphlora.onnx.runtime",
    "choose_providers": "graphlora.onnx.runtime",
    "ProviderChoice": "graphlora.onnx.runtime",
    "FUSION_BLOCKERS": "graphlora.onnx.runtime",
    "write_adapter": "graphlora.onnx.adapters",
    "read_adapter": "graphlora.onnx.adapters",
    "load_adapter": "graphlora.onnx.adapters",
    "adapter_tensors": "graphlora.onnx.adapters",
    "LOWERINGS": "graphlora.onnx.lowering",
    "lower_model": "graphlora.onnx.lowering",
    "optimized_model": "graphlora.onnx.optimized",
    "float_fallbacks": "graphlora.onnx.optimized",
    "quantized_kernels": "graphlora.onnx.optimized",
    "op_counts": "graphlora.onnx.optimized",
    "LORA_MODES": "graphlora.onnx.prepare",
    "generate": "graphlora.onnx.greedy",
    "write_genai": "graphlora.onnx.genai",
    "genai_config": "graphlora.onnx.genai",
    "conform": "graphlora.onnx.adapters",
}

__all__ = [
    "FUSION_BLOCKERS",
    "LORA_MODES",
    "LOWERINGS",
    "InferenceSession",
    "OnnxExport",
    "ProviderChoice",
    "adapter_tensors",
    "choose_providers",
    "conform",
    "export_onnx",
    "float_fallbacks",
    "generate",
    "genai_config",
    "load_adapter",
    "lower_model",
    "op_counts",
    "optimized_model",
    "quantized_kernels",
    "read_adapter",
    "save_model",
    "write_adapter",
    "write_genai",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'graphlora.onnx' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
