"""Read what onnxruntime actually runs: the optimised graph, not the exported one.

"Accelerated, not emulated" is a property of the graph onnxruntime builds at session creation
(``SessionOptions.optimized_model_filepath``): a blocked 4-bit ``DequantizeLinear -> MatMul`` must
have become ``MatMulNBits``, an 8-bit QDQ MatMul ``QLinearMatMul`` / ``MatMulIntegerToFloat``, and
no float ``MatMul``/``Gemm`` may still read a dequantized weight. Tests and benchmarks use these
helpers to assert exactly that.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx

#: onnxruntime kernels that compute with quantized weights directly
QUANTIZED_KERNELS = frozenset({
    "MatMulNBits", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm",
    "MatMulInteger", "MatMulBnb4", "QAttention",
})
FLOAT_MATMULS = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm"})


def optimized_model(path: str | os.PathLike, *, providers="cpu", accuracy_level: int | None = 0,
                    disable_matmul_add_fusion: bool = True, keep: str | os.PathLike | None = None
                    ) -> onnx.ModelProto:
    """The model as onnxruntime optimised it for ``providers`` (loaded back from disk)."""
    from graphlora.onnx.runtime import InferenceSession

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(keep) if keep is not None else Path(tmp) / "optimized.onnx"
        InferenceSession(path, providers, accuracy_level=accuracy_level,
                         optimized_model_path=target,
                         disable_matmul_add_fusion=disable_matmul_add_fusion)
        return onnx.load(os.fspath(target))


def op_counts(model: onnx.ModelProto) -> Counter:
    """``op_type -> count`` over the main graph."""
    return Counter(n.op_type for n in model.graph.node)


@dataclass(frozen=True)
class FloatFallback:
    node: str
    op_type: str
    weight: str


def float_fallbacks(model: onnx.ModelProto) -> list[FloatFallback]:
    """Float MatMul/Gemm nodes whose weight input is a ``DequantizeLinear`` of a constant: a
    quantized site onnxruntime did not fuse (it dequantizes every run and multiplies in float)."""
    constants = {i.name for i in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type not in FLOAT_MATMULS:
            continue
        for name in node.input[1:2]:
            dq = producers.get(name)
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in constants:
                found.append(FloatFallback(node.name, node.op_type, dq.input[0]))
    return found


def quantized_kernels(model: onnx.ModelProto) -> Counter:
    """Counts of the quantized kernels in an optimised model."""
    return Counter(n.op_type for n in model.graph.node if n.op_type in QUANTIZED_KERNELS)
