"""Lower the ``pkg.graphlora`` dialect to standard ONNX: the one place that knows the mapping.

===========================================  ===========================================================
graphlora op (dialect node)                  ONNX after lowering
===========================================  ===========================================================
``dequantize_packed4`` (int4/uint4)          ``INT4``/``UINT4`` initializer -> ``DequantizeLinear``
                                             (opset 21; blocked: ``axis`` = the blocked axis,
                                             ``block_size``; per-channel: ``axis``; per-tensor)
``dequantize`` (int8/uint8/int16 codes)      integer initializer -> ``DequantizeLinear``
``dequantize_fp8``                           ``FLOAT8E4M3FN`` initializer -> ``DequantizeLinear``
``fake_quantize`` of a constant (LoRA A/B)   integer initializer (codes computed at export by
                                             ``graphlora::quantize``) -> ``DequantizeLinear``
``fake_quantize`` of an activation           ``QuantizeLinear`` -> ``DequantizeLinear`` (zero point
                                             typed uint8/int8/int16/uint16: it selects the type)
``quantize`` / ``quantize_fp8``              ``QuantizeLinear``
``dequantize_nf4`` / ``dequantize_nf4_dq``   ``com.microsoft.MatMulBnb4`` (quant_type 1) replacing
  feeding a MatMul                           the MatMul; onnxruntime-specific (QDQ cannot express a
                                             codebook). Double-quantized absmax is expanded.
===========================================  ===========================================================

Weights are laid out for their consumer so onnxruntime's fusions apply: a weight read by
``MatMul`` (through any number of ``Transpose`` nodes, or as ``Gemm``'s B with ``transB``) is
stored in the ``(K, N)`` orientation the MatMul reads — blocked 4-bit with ``axis=0``, the layout
``DQMatMulToMatMulNBits`` fuses into ``MatMulNBits`` — and a ``Gemm`` on a quantized weight
becomes ``MatMul`` + ``Add`` (the fusions match MatMul). Each consumer gets its own
``DequantizeLinear`` (the fusions require a single consumer); initializers are shared.
Scales are stored in the dtype the graphlora op returns (float16 scales of 4-bit weights become
float32 for a float32 model: exact, and what ``MatMulNBits`` takes for float32 activations).

Every code, scale, zero point and packed nibble is computed by :mod:`graphlora.quant` (in torch);
the lowering only re-lays out (transpose, reshape), re-types and rewires. This module drives it;
the work is done by :mod:`~graphlora.onnx.weight_lowering` (weights and their consumers),
:mod:`~graphlora.onnx.nf4_lowering` (``MatMulBnb4``), :mod:`~graphlora.onnx.activation_lowering`
(Q/DQ of activations), over :mod:`~graphlora.onnx.ir_edit` (graph editing) and
:mod:`~graphlora.onnx.qdq_types` (ONNX types, torch <-> ONNX arrays).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir
import torch
from torch import fx

from graphlora import meta
from graphlora.errors import ExportError
from graphlora.onnx.activation_lowering import (
    lower_fake_quantize_activation,
    lower_quantize,
    lower_quantize_fp8,
)
from graphlora.onnx.dialect import DOMAIN
from graphlora.onnx.ir_edit import base_name, const, forget_node_names, is_op, remove_dead, where
from graphlora.onnx.nf4_lowering import lower_nf4
from graphlora.onnx.qdq_types import MIN_OPSET, smallest_int_type
from graphlora.onnx.weight_lowering import (
    QuantWeight,
    check_opset,
    lower_weight,
    read_dequantize,
    read_fake_quantized,
    read_fp8,
    read_packed4,
)
from graphlora.quant.ops import OPS


@dataclass
class LoweringReport:
    """What the lowering did, for logs and tests."""

    weights: dict[str, str] = field(default_factory=dict)  # initializer base name -> qtype
    activations: int = 0
    contrib_ops: list[str] = field(default_factory=list)
    #: MatMuls onnxruntime has no fused kernel for (e.g. 4-bit weights with quantized activations)
    unfused: list[str] = field(default_factory=list)


def required_opset(gm: fx.GraphModule) -> list[tuple[str, int]]:
    """``(where, opset)`` for every graphlora op in an FX graph needing more than opset 18, so
    export can refuse an opset before spending time in torch.onnx."""
    needs = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in OPS.values():
            continue
        info = meta.info(node)
        tensor = info.get("tensor") or info.get("module_path") or node.name
        name = node.target._opname
        if name == "dequantize_packed4":
            needs.append((f"{tensor} (4-bit weight)", 21))
        elif name in ("dequantize", "fake_quantize", "quantize"):
            block = node.args[4] if len(node.args) > 4 else None
            if block is not None:
                needs.append((f"{tensor} (blocked quantization)", 21))
            if name == "dequantize":
                q = node.args[0]
                val = q.meta.get("val") if hasattr(q, "meta") else None
                if val is not None and val.dtype in (torch.int16, torch.int32):
                    needs.append((f"{tensor} (16-bit codes)", 21))
            else:
                qmin, qmax = node.args[5], node.args[6]
                dtype = smallest_int_type(int(qmin), int(qmax))
                if MIN_OPSET.get(dtype, 21) > 18:
                    needs.append((f"{tensor} ({dtype.name.lower()})", MIN_OPSET.get(dtype, 21)))
        elif name in ("dequantize_fp8", "quantize_fp8"):
            needs.append((f"{tensor} (float8)", 19))
    return needs


def _lower_fake_quantize(graph: ir.Graph, node: ir.Node, opset: int, report: LoweringReport) -> None:
    """A constant under ``fake_quantize`` is a weight (stored as codes); anything else an
    activation (Q/DQ)."""
    x = const(node.inputs[0])
    if x is None:
        lower_fake_quantize_activation(graph, node, opset)
        report.activations += 1
        return
    qw = read_fake_quantized(node, x)
    check_opset(qw, opset)
    lower_weight(graph, node, qw)
    report.weights[qw.name] = qw.qtype.name


def _weight_lowering(reader: Callable[[ir.Node], QuantWeight]):
    def lower(graph: ir.Graph, node: ir.Node, opset: int, report: LoweringReport) -> None:
        qw = reader(node)
        check_opset(qw, opset)
        lower_weight(graph, node, qw)
        report.weights[qw.name] = qw.qtype.name

    return lower


def _nf4(graph: ir.Graph, node: ir.Node, opset: int, report: LoweringReport) -> None:
    lower_nf4(graph, node)
    report.weights[base_name(node)] = "nf4"
    report.contrib_ops.append("MatMulBnb4")


def _plain(fn: Callable[[ir.Graph, ir.Node, int], None]):
    def lower(graph: ir.Graph, node: ir.Node, opset: int, report: LoweringReport) -> None:
        fn(graph, node, opset)

    return lower


#: dialect op name -> lowering function (graph, node, opset, report)
LOWERINGS: dict[str, Callable] = {
    "dequantize_packed4": _weight_lowering(read_packed4),
    "dequantize": _weight_lowering(read_dequantize),
    "dequantize_fp8": _weight_lowering(read_fp8),
    "fake_quantize": _lower_fake_quantize,
    "dequantize_nf4": _nf4,
    "dequantize_nf4_dq": _nf4,
    "quantize": _plain(lower_quantize),
    "quantize_fp8": _plain(lower_quantize_fp8),
}


def lower_model(model: ir.Model, *, opset: int) -> LoweringReport:
    """Rewrite every ``pkg.graphlora`` node of ``model`` (in place) into standard ONNX."""
    graph = model.graph
    forget_node_names(graph)
    report = LoweringReport()
    for node in list(graph):
        if node.domain != DOMAIN:
            continue
        lower = LOWERINGS.get(node.op_type)
        if lower is None:
            raise ExportError(f"no ONNX lowering for graphlora::{node.op_type} ({where(node)})")
        lower(graph, node, opset, report)
    remove_dead(graph)
    report.unfused = _unfusable_matmuls(graph)
    graph.opset_imports.pop(DOMAIN, None)
    model.opset_imports.pop(DOMAIN, None)
    leftover = [n.op_type for n in graph if n.domain == DOMAIN]
    if leftover:
        raise ExportError(f"graphlora dialect nodes left after lowering: {sorted(set(leftover))}")
    forget_node_names(graph)
    return report


def _unfusable_matmuls(graph: ir.Graph) -> list[str]:
    """MatMuls reading a 4-bit weight *and* a dequantized activation: onnxruntime has no static
    W4A8 kernel, so they run in float (the activation QDQ is still honoured)."""
    found = []
    for node in graph:
        if not is_op(node, "MatMul") or len(node.inputs) < 2:
            continue
        a, b = (v.producer() if v is not None else None for v in node.inputs[:2])
        if (a is not None and is_op(a, "DequantizeLinear") and b is not None
                and is_op(b, "DequantizeLinear")
                and b.inputs[0].dtype in (ir.DataType.INT4, ir.DataType.UINT4)):
            found.append(b.inputs[0].name)
    return found
