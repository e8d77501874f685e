"""Quantized weights -> integer (or float8) initializers read by ``DequantizeLinear``.

A weight dialect node (``dequantize_packed4``, ``dequantize``, ``dequantize_fp8``, or
``fake_quantize`` of a constant) is read into a :class:`QuantWeight` — graphlora's codes in the
canonical ``(C, K)`` layout, computed by :mod:`graphlora.quant` — and every consumer gets its own
``DequantizeLinear`` over initializers laid out the way it reads the weight: a weight read by
``MatMul`` (through any number of 2-D ``Transpose`` nodes, or as ``Gemm``'s B with ``transB``) is
stored ``(K, N)``, blocked 4-bit with ``axis=0`` (the layout onnxruntime fuses into
``MatMulNBits``), and a ``Gemm`` on a quantized weight becomes ``MatMul`` + ``Add`` (the fusions
match MatMul). Layout changes are transposes only; the initializers are shared between consumers
reading the same orientation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from graphlora.errors import ExportError
from graphlora.onnx.ir_edit import (
    add_initializer,
    attr,
    base_name,
    copy_type,
    is_op,
    optional_const,
    replace_value,
    require_const,
    unique_node_name,
    where,
)
from graphlora.onnx.qdq_types import (
    MIN_OPSET,
    at_least_1d,
    code_tensor,
    float_array,
    float_type,
    smallest_int_type,
    to_torch,
)
from graphlora.quant import affine, ops
from graphlora.quant.packing import unpack_4bit


# ----------------------------------------------------------------------------- weight record
@dataclass
class QuantWeight:
    """A quantized weight in graphlora's canonical form, ready to be laid out for a consumer.

    ``codes`` is the ``(C, K)`` matrix (channel axis first) of integer codes or float8 values;
    ``scale``/``zero_point`` are ``()``, ``(C,)`` or ``(C, n_blocks)`` (float32 / integer codes).
    ``shape``/``axis`` describe the parameter as the graph reads it (``axis`` = its channel axis).
    """

    name: str
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    qtype: ir.DataType
    block_size: int | None
    shape: tuple[int, ...]
    axis: int
    out_dtype: ir.DataType
    where: str
    _cache: dict = field(default_factory=dict)

    @property
    def granularity(self) -> str:
        if self.block_size is not None:
            return "block"
        return "channel" if self.scale.dim() == 1 else "tensor"

    @property
    def param_orientation(self) -> str:
        """``ck`` when the parameter is stored channel-first, ``kc`` when channel-last."""
        if len(self.shape) != 2:
            return "nd"
        return "ck" if self.axis == 0 else "kc"


def flip(orientation: str) -> str:
    """The other orientation of a 2-D weight."""
    return {"ck": "kc", "kc": "ck"}[orientation]


def _scale(node: ir.Node) -> torch.Tensor:
    return to_torch(require_const(node, 1, "scale")).to(torch.float32)


def _zero_point(node: ir.Node) -> torch.Tensor | None:
    zp = optional_const(node, 2, "zero point")
    return None if zp is None else to_torch(zp)


def _channel_axis(node: ir.Node, scale: torch.Tensor, ndim: int) -> int:
    """The canonical layout's channel axis: the node's ``axis``, or 0 for a per-tensor scale."""
    axis = attr(node, "axis")
    return 0 if axis is None or scale.dim() == 0 else int(axis) % ndim


def _block(node: ir.Node) -> int | None:
    block = attr(node, "block_size")
    return None if block is None else int(block)


# ----------------------------------------------------------------------------- weight readers
def read_packed4(node: ir.Node) -> QuantWeight:
    """``dequantize_packed4``: graphlora's packed canonical bytes, unpacked by graphlora."""
    packed = to_torch(require_const(node, 0, "packed weight"))
    shape = tuple(int(d) for d in attr(node, "shape"))
    axis = int(attr(node, "axis")) % len(shape)
    signed = bool(attr(node, "signed"))
    c = shape[axis]
    return QuantWeight(
        name=base_name(node), codes=unpack_4bit(packed, math.prod(shape) // c, signed=signed),
        scale=_scale(node), zero_point=_zero_point(node),
        qtype=ir.DataType.INT4 if signed else ir.DataType.UINT4, block_size=_block(node),
        shape=shape, axis=axis, out_dtype=float_type(attr(node, "dtype")), where=where(node),
    )


# codes dtype of graphlora::dequantize -> the ONNX type storing them (int32 holds uint16 codes)
_CODE_TYPES = {
    np.dtype(np.int8): ir.DataType.INT8, np.dtype(np.uint8): ir.DataType.UINT8,
    np.dtype(np.int16): ir.DataType.INT16, np.dtype(np.int32): ir.DataType.UINT16,
}


def read_dequantize(node: ir.Node) -> QuantWeight:
    """``dequantize``: 8/16-bit codes stored as they are."""
    q = require_const(node, 0, "codes")
    qtype = _CODE_TYPES.get(q.dtype)
    if qtype is None:
        raise ExportError(f"graphlora::dequantize ({where(node)}): codes of dtype {q.dtype} have no "
                          "ONNX QDQ type")
    if qtype == ir.DataType.UINT16 and (q.min() < 0 or q.max() > 65535):
        raise ExportError(f"graphlora::dequantize ({where(node)}): int32 codes outside uint16")
    scale = _scale(node)
    axis = _channel_axis(node, scale, q.ndim)
    return QuantWeight(
        name=base_name(node), codes=affine.to_canonical(to_torch(q), axis), scale=scale,
        zero_point=_zero_point(node), qtype=qtype, block_size=_block(node), shape=tuple(q.shape),
        axis=axis, out_dtype=float_type(attr(node, "dtype")), where=where(node),
    )


def read_fp8(node: ir.Node) -> QuantWeight:
    """``dequantize_fp8``: float8 values stored as they are."""
    q = require_const(node, 0, "fp8 weight")
    scale = _scale(node)
    axis = _channel_axis(node, scale, q.ndim)
    return QuantWeight(
        name=base_name(node), codes=affine.to_canonical(to_torch(q), axis), scale=scale,
        zero_point=None, qtype=ir.DataType.FLOAT8E4M3FN, block_size=None, shape=tuple(q.shape),
        axis=axis, out_dtype=float_type(attr(node, "dtype")), where=where(node),
    )


_OUT_TYPES = {np.dtype(np.float32): ir.DataType.FLOAT, np.dtype(np.float16): ir.DataType.FLOAT16}


def read_fake_quantized(node: ir.Node, x: np.ndarray) -> QuantWeight:
    """``fake_quantize`` of the constant ``x`` (a quantized LoRA weight): its codes are what
    ``graphlora::quantize`` gives for the same parameters."""
    scale = _scale(node)
    zp = _zero_point(node)
    qmin, qmax = int(attr(node, "qmin")), int(attr(node, "qmax"))
    block = _block(node)
    axis = _channel_axis(node, scale, x.ndim)
    codes = ops.quantize(to_torch(x), scale, zp, axis, block, qmin, qmax, torch.int32)
    return QuantWeight(
        name=base_name(node, x_name=node.inputs[0].name), codes=affine.to_canonical(codes, axis),
        scale=scale, zero_point=zp, qtype=smallest_int_type(qmin, qmax), block_size=block,
        shape=tuple(x.shape), axis=axis, out_dtype=_OUT_TYPES.get(x.dtype, ir.DataType.FLOAT),
        where=where(node),
    )


def check_opset(qw: QuantWeight, opset: int) -> None:
    """Refuse an opset whose DequantizeLinear cannot read ``qw``'s type or blocks."""
    need = MIN_OPSET.get(qw.qtype, 21)
    if qw.granularity == "block":
        need = max(need, 21)
    if opset < need:
        what = "blocked " if qw.granularity == "block" else ""
        raise ExportError(
            f"{qw.where} ({qw.name}): {what}{qw.qtype.name} DequantizeLinear needs opset >= {need}, "
            f"export was asked for opset {opset}; use opset={max(need, 21)}"
        )


# ----------------------------------------------------------------------------- emission
def _layout(qw: QuantWeight, orientation: str) -> tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor | None, dict]:
    """(codes, scale, zero point, DequantizeLinear attributes) of ``qw`` in ``orientation``."""
    scale, zp = qw.scale, qw.zero_point
    if orientation == "nd":
        codes = affine.from_canonical(qw.codes, qw.shape, qw.axis)
        attrs = {"axis": qw.axis} if qw.granularity == "channel" else {}
        return codes, scale, zp, attrs
    codes = qw.codes if orientation == "ck" else qw.codes.T
    if qw.granularity == "block":
        if orientation == "kc":
            scale = scale.T
            zp = None if zp is None else zp.T
        attrs = {"axis": 1 if orientation == "ck" else 0, "block_size": qw.block_size}
    elif qw.granularity == "channel":
        attrs = {"axis": 0 if orientation == "ck" else 1}
    else:
        attrs = {}
    return codes, scale, zp, attrs


def emit_dequantize(graph: ir.Graph, qw: QuantWeight, orientation: str, before: ir.Node) -> ir.Value:
    """A ``DequantizeLinear`` producing ``qw`` in ``orientation``, inserted before ``before``."""
    key = orientation
    if key not in qw._cache:
        codes, scale, zp, attrs = _layout(qw, orientation)
        suffix = "" if orientation in ("nd", qw.param_orientation) else "_t"
        q_val = add_initializer(graph, f"{qw.name}.quantized{suffix}", code_tensor(codes, qw.qtype))
        s_val = add_initializer(graph, f"{qw.name}.scale{suffix}",
                                float_array(at_least_1d(scale), qw.out_dtype))
        z_val = None if zp is None else add_initializer(graph, f"{qw.name}.zero_point{suffix}",
                                                        code_tensor(zp, qw.qtype))
        qw._cache[key] = (q_val, s_val, z_val, attrs, tuple(codes.shape))
    q_val, s_val, z_val, attrs, shape = qw._cache[key]
    inputs = [q_val, s_val] + ([z_val] if z_val is not None else [])
    node = ir.node("DequantizeLinear", inputs, attributes=attrs,
                   name=unique_node_name(graph, f"{qw.name}/DequantizeLinear"))
    out = node.outputs[0]
    out.name = node.name + ":0"
    out.dtype = qw.out_dtype
    out.shape = ir.Shape(shape)
    graph.insert_before(before, node)
    return out


# ----------------------------------------------------------------------------- consumers
@dataclass
class WeightUse:
    """One consumer of a weight: ``node.inputs[index]`` sees the parameter transposed or not."""

    node: ir.Node
    index: int
    transposed: bool


def _is_2d_transpose(node: ir.Node) -> bool:
    if not is_op(node, "Transpose"):
        return False
    perm = attr(node, "perm")
    return perm is None or list(perm) == [1, 0]


def weight_uses(value: ir.Value, ndim: int, transposed: bool = False) -> list[WeightUse]:
    """Consumers of ``value`` (a weight of rank ``ndim``) looking through 2-D Transposes."""
    uses = []
    for node, index in value.uses():
        if _is_2d_transpose(node) and ndim == 2:
            out = node.outputs[0]
            if out.is_graph_output():
                uses.append(WeightUse(node, index, transposed))
            uses.extend(weight_uses(out, ndim, not transposed))
        else:
            uses.append(WeightUse(node, index, transposed))
    if value.is_graph_output():
        raise ExportError(f"quantized weight {value.name!r} is a graph output; export cannot keep it "
                          "quantized")
    return uses


def gemm_as_matmul(graph: ir.Graph, gemm: ir.Node, b: ir.Value) -> tuple[ir.Node, int]:
    """Replace ``Gemm(A, W, C)`` (alpha=beta=1, no transA) by ``MatMul(A, b) [+ Add(C)]``.

    Returns the MatMul and the weight's input index (1).
    """
    if attr(gemm, "transA", 0) or attr(gemm, "alpha", 1.0) != 1.0 or (
        len(gemm.inputs) > 2 and gemm.inputs[2] is not None and attr(gemm, "beta", 1.0) != 1.0
    ):
        raise ExportError(f"Gemm {where(gemm)} with transA/alpha/beta reads a quantized weight; "
                          "only plain linear layers are supported")
    a = gemm.inputs[0]
    matmul = ir.node("MatMul", [a, b], name=unique_node_name(graph, f"{gemm.name}/MatMul"))
    nodes = [matmul]
    result = matmul.outputs[0]
    result.name = matmul.name + ":0"
    old_out = gemm.outputs[0]
    copy_type(old_out, result)
    if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
        add = ir.node("Add", [result, gemm.inputs[2]], name=unique_node_name(graph, f"{gemm.name}/Add"))
        nodes.append(add)
        result = add.outputs[0]
        result.name = add.name + ":0"
        copy_type(old_out, result)
    graph.insert_before(gemm, nodes)
    replace_value(old_out, result)
    graph.remove(gemm, safe=True)
    return matmul, 1


def lower_weight(graph: ir.Graph, node: ir.Node, qw: QuantWeight) -> None:
    """Feed every consumer of a weight dialect node its own DequantizeLinear."""
    if len(qw.shape) != 2:
        for use in weight_uses(node.outputs[0], len(qw.shape)):
            if use.transposed:
                raise ExportError(f"{qw.where}: transposed use of a {len(qw.shape)}-D quantized weight")
            use.node.replace_input_with(use.index, emit_dequantize(graph, qw, "nd", use.node))
        return
    for use in weight_uses(node.outputs[0], 2):
        consumer, index = use.node, use.index
        orientation = flip(qw.param_orientation) if use.transposed else qw.param_orientation
        if is_op(consumer, "Gemm") and index == 1:
            if attr(consumer, "transB", 0):
                orientation = flip(orientation)
            b = emit_dequantize(graph, qw, orientation, consumer)
            gemm_as_matmul(graph, consumer, b)
            continue
        if is_op(consumer, "Gemm") and index == 0 and attr(consumer, "transA", 0):
            orientation = flip(orientation)
        consumer.replace_input_with(index, emit_dequantize(graph, qw, orientation, consumer))
