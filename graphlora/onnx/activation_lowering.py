"""Quantized activations -> ``QuantizeLinear`` (-> ``DequantizeLinear``).

An activation's ``fake_quantize`` becomes a Q/DQ pair over its calibrated scale and zero point
(stored re-typed only: the float type of the activation, the integer type the code range names —
the zero point's type is what selects QuantizeLinear's output type). ``QuantizeLinear`` always
saturates to the full range of its type; an encoding on the restricted symmetric grid (int8
-127..127) gets a ``Clip`` in front, at the float values of its end codes (dequantized by
:mod:`graphlora.quant`), so the codes QuantizeLinear produces are exactly graphlora's.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from graphlora.errors import ExportError
from graphlora.onnx.ir_edit import (
    add_initializer,
    attr,
    base_name,
    copy_type,
    optional_const,
    replace_value,
    require_const,
    unique_node_name,
    where,
)
from graphlora.onnx.qdq_types import (
    FLOAT_NUMPY,
    FULL_RANGE,
    MIN_OPSET,
    code_tensor,
    float_array,
    to_torch,
)
from graphlora.quant import ops


def lower_fake_quantize_activation(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    """``fake_quantize`` of a computed tensor -> ``QuantizeLinear`` -> ``DequantizeLinear``."""
    x = node.inputs[0]
    qmin, qmax = int(attr(node, "qmin")), int(attr(node, "qmax"))
    qtype = FULL_RANGE.get((qmin, qmax))
    clip = None
    if qtype is None:
        qtype = _restricted_type(qmin, qmax)
        if qtype is None:
            raise ExportError(
                f"activation fake-quant {where(node)}: code range [{qmin}, {qmax}] is neither the "
                "full range of an ONNX integer type (which QuantizeLinear saturates to) nor its "
                "restricted symmetric grid; calibrate with grid='full' or 'restricted'")
        clip = _clip_node(graph, node)
        x = clip.outputs[0]
    if opset < MIN_OPSET.get(qtype, 21):
        raise ExportError(f"activation fake-quant {where(node)}: {qtype.name} QuantizeLinear needs "
                          f"opset >= {MIN_OPSET[qtype]}, export was asked for opset {opset}")
    q, dq = _qdq_nodes(graph, node, qtype, x)
    graph.insert_before(node, ([clip] if clip is not None else []) + [q, dq])
    out = dq.outputs[0]
    out.name = dq.name + ":0"
    copy_type(x, out)
    replace_value(node.outputs[0], out)


def _restricted_type(qmin: int, qmax: int) -> ir.DataType | None:
    """The ONNX type whose restricted symmetric grid ``[qmin, qmax]`` is (its qmin one higher)."""
    return FULL_RANGE.get((qmin - 1, qmax))


def _clip_node(graph: ir.Graph, node: ir.Node) -> ir.Node:
    """``Clip`` of the fake-quant's input to the float values of its end codes ``qmin``/``qmax``
    (dequantized by graphlora.quant), so the QuantizeLinear after it never reaches the code the
    restricted grid leaves out."""
    x = node.inputs[0]
    scale = to_torch(require_const(node, 1, "scale"))
    if scale.dim() != 0:
        raise ExportError(f"activation fake-quant {where(node)}: a restricted grid exports per "
                          "tensor only (Clip takes scalar bounds)")
    zp = optional_const(node, 2, "zero point")
    zp = None if zp is None else to_torch(zp)
    ends = torch.tensor([int(attr(node, "qmin")), int(attr(node, "qmax"))], dtype=torch.int32)
    lo, hi = ops.dequantize(ends, scale, zp, None, None, torch.float32)
    float_dtype = x.dtype if x.dtype in FLOAT_NUMPY else ir.DataType.FLOAT
    base = base_name(node, x_name=node.inputs[1].name)
    base = base.rsplit(".", 1)[0] if base.endswith(".scale") else base
    lo_val = add_initializer(graph, f"{base}.clip_min", float_array(lo, float_dtype))
    hi_val = add_initializer(graph, f"{base}.clip_max", float_array(hi, float_dtype))
    clip = ir.node("Clip", [x, lo_val, hi_val], name=unique_node_name(graph, f"{base}/Clip"))
    clip.outputs[0].name = clip.name + ":0"
    copy_type(x, clip.outputs[0])
    return clip


def _qdq_nodes(graph: ir.Graph, node: ir.Node, qtype: ir.DataType,
               x: ir.Value | None = None) -> tuple[ir.Node, ir.Node]:
    x = node.inputs[0] if x is None else x
    scale = to_torch(require_const(node, 1, "scale"))
    zp = optional_const(node, 2, "zero point")
    zp = torch.zeros(scale.shape, dtype=torch.int32) if zp is None else to_torch(zp)
    float_dtype = x.dtype if x.dtype in FLOAT_NUMPY else ir.DataType.FLOAT
    axis, block = attr(node, "axis"), attr(node, "block_size")
    attrs = {}
    if scale.dim() >= 1:
        attrs["axis"] = int(axis if axis is not None else 1)
        if block is not None:
            raise ExportError(f"fake-quant {where(node)}: blocked activation quantization "
                              "is not supported by onnxruntime's QuantizeLinear fusions")
    zp_in = node.inputs[2] if len(node.inputs) > 2 else None
    base = base_name(node, x_name=(zp_in.name if zp_in is not None else node.inputs[1].name))
    base = base.rsplit(".", 1)[0] if base.endswith((".scale", ".zero_point")) else base
    s_val = add_initializer(graph, f"{base}.scale", float_array(scale, float_dtype))
    z_val = add_initializer(graph, f"{base}.zero_point", code_tensor(zp, qtype))
    q = ir.node("QuantizeLinear", [x, s_val, z_val], attributes=attrs,
                name=unique_node_name(graph, f"{base}/QuantizeLinear"))
    q.outputs[0].name = q.name + ":0"
    q.outputs[0].dtype = qtype
    if x.shape is not None:
        q.outputs[0].shape = x.shape
    dq = ir.node("DequantizeLinear", [q.outputs[0], s_val, z_val], attributes=attrs,
                 name=unique_node_name(graph, f"{base}/DequantizeLinear"))
    return q, dq


def lower_quantize(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    """``quantize`` (codes as a graph value) -> ``QuantizeLinear``."""
    qmin, qmax = int(attr(node, "qmin")), int(attr(node, "qmax"))
    qtype = FULL_RANGE.get((qmin, qmax))
    if qtype is None:
        raise ExportError(f"graphlora::quantize {where(node)}: range [{qmin}, {qmax}] is not a full "
                          "ONNX integer type range")
    q, _ = _qdq_nodes(graph, node, qtype)
    graph.insert_before(node, q)
    replace_value(node.outputs[0], q.outputs[0])


def lower_quantize_fp8(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    """``quantize_fp8`` -> ``QuantizeLinear`` with a float8 zero point (which selects e4m3fn)."""
    if opset < 19:
        raise ExportError(f"graphlora::quantize_fp8 {where(node)}: float8 needs opset >= 19")
    scale = to_torch(require_const(node, 1, "scale"))
    axis = attr(node, "axis")
    name = base_name(node)
    zp = add_initializer(graph, f"{name}.fp8_zero_point",
                         np.zeros(tuple(scale.shape), ml_dtypes.float8_e4m3fn))
    s_val = add_initializer(graph, f"{name}.scale", float_array(scale, ir.DataType.FLOAT))
    attrs = {"axis": int(axis)} if scale.dim() else {}
    q = ir.node("QuantizeLinear", [node.inputs[0], s_val, zp], attributes=attrs,
                name=unique_node_name(graph, f"{name}/QuantizeLinear"))
    q.outputs[0].name = q.name + ":0"
    graph.insert_before(node, q)
    replace_value(node.outputs[0], q.outputs[0])
