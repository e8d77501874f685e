"""NF4 weights -> onnxruntime's ``com.microsoft.MatMulBnb4`` (quant_type 1).

QDQ cannot express a codebook, so an NF4 weight feeding a MatMul replaces that MatMul with
``MatMulBnb4``: onnxruntime-specific, float32 only, blocks of 16..256 along K. Its ``B`` input is
the ``(N, K)`` code matrix packed in bitsandbytes' nibble order (first code in the HIGH nibble,
:func:`graphlora.quant.packing.pack_4bit` with ``high_first``); its ``absmax`` input is float32,
a double-quantized absmax expanded by :func:`graphlora.quant.ops.dequantize_double_quant`.
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from graphlora.errors import ExportError
from graphlora.onnx.ir_edit import (
    add_initializer,
    attr,
    base_name,
    copy_type,
    is_op,
    replace_value,
    require_const,
    unique_node_name,
    where,
)
from graphlora.onnx.qdq_types import float_array, float_type, to_torch
from graphlora.onnx.weight_lowering import flip, gemm_as_matmul, weight_uses
from graphlora.quant.ops import dequantize_double_quant
from graphlora.quant.packing import pack_4bit, unpack_4bit

MS_DOMAIN = "com.microsoft"
_BNB_BLOCKS = (16, 32, 64, 128, 256)


def _absmax(node: ir.Node) -> torch.Tensor:
    """The float32 absmax the NF4 weight dequantizes with (double quantization undone)."""
    if node.op_type != "dequantize_nf4_dq":
        return to_torch(require_const(node, 1, "absmax")).to(torch.float32)
    return dequantize_double_quant(
        to_torch(require_const(node, 1, "absmax codes")),
        to_torch(require_const(node, 2, "absmax scale")),
        to_torch(require_const(node, 3, "absmax mean")),
        int(attr(node, "absmax_block_size")),
    )


def lower_nf4(graph: ir.Graph, node: ir.Node) -> None:
    """Replace every MatMul reading the NF4 weight of ``node`` by a ``MatMulBnb4``."""
    packed = to_torch(require_const(node, 0, "packed weight"))
    shape = tuple(int(d) for d in attr(node, "shape"))
    axis = int(attr(node, "axis")) % len(shape)
    absmax = _absmax(node)
    block = attr(node, "block_size")
    name = base_name(node)
    described = f"{where(node)} ({name})"
    if len(shape) != 2:
        raise ExportError(f"NF4 weight {described}: only 2-D weights lower to MatMulBnb4")
    c = shape[axis]
    k = shape[1 - axis]
    if block is None:
        if absmax.dim() != 1:
            raise ExportError(f"NF4 weight {described}: per-tensor NF4 has no MatMulBnb4 layout")
        block = k
    block = int(block)
    if block not in _BNB_BLOCKS or k % block:
        raise ExportError(
            f"NF4 weight {described}: MatMulBnb4 needs a block size in {_BNB_BLOCKS} dividing the "
            f"input features ({k}); got {block}"
        )
    codes = unpack_4bit(packed, k, signed=False)  # (C, K) = (N, K)
    bnb = pack_4bit(codes.reshape(-1), signed=False, high_first=True)
    if float_type(attr(node, "dtype")) != ir.DataType.FLOAT:
        raise ExportError(f"NF4 weight {described}: onnxruntime's CPU MatMulBnb4 takes float32 only")
    b_val = add_initializer(graph, f"{name}.nf4", bnb.numpy())
    a_val = add_initializer(graph, f"{name}.absmax",
                            float_array(absmax.reshape(-1), ir.DataType.FLOAT))
    param = "ck" if axis == 0 else "kc"
    for use in weight_uses(node.outputs[0], 2):
        consumer, index = use.node, use.index
        orientation = flip(param) if use.transposed else param
        if is_op(consumer, "Gemm") and index == 1:
            if attr(consumer, "transB", 0):
                orientation = flip(orientation)
            b = node.outputs[0]  # placeholder: the MatMulBnb4 replaces the MatMul below
            consumer, index = gemm_as_matmul(graph, consumer, b)
        if not (is_op(consumer, "MatMul") and index == 1):
            raise ExportError(
                f"NF4 weight {described} is read by {consumer.op_type}, not as a MatMul weight; "
                "NF4 lowers only to onnxruntime's MatMulBnb4"
            )
        if orientation != "kc":
            raise ExportError(f"NF4 weight {described}: the MatMul reads it with blocks along N; "
                              "MatMulBnb4 needs blocks along K")
        bnb4 = ir.node(
            "MatMulBnb4", [consumer.inputs[0], b_val, a_val],
            attributes={"K": k, "N": c, "block_size": block, "quant_type": 1},
            domain=MS_DOMAIN, name=unique_node_name(graph, f"{name}/MatMulBnb4"),
        )
        new_out = bnb4.outputs[0]
        old_out = consumer.outputs[0]
        new_out.name = bnb4.name + ":0"
        copy_type(old_out, new_out, default=ir.DataType.FLOAT)
        graph.insert_before(consumer, bnb4)
        replace_value(old_out, new_out)
        graph.remove(consumer, safe=True)
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
