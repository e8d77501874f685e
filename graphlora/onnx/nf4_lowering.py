"""NF4 weights -> onnxruntime's ``com.microsoft.MatMulBnb4`` (quant_type 1).

QDQ cannot express a codebook, so an NF4 weight feeding a MatMul replaces that MatMul with
``MatMulBnb4``: onnxruntime-specific, float32 only, blocks of 16..256 along K over the flattened
``(N, K)`` code matrix. Its ``B`` input is that matrix packed in bitsandbytes' nibble order (first
code in the HIGH nibble, :func:`graphlora.quant.packing.pack_4bit` with ``high_first``); its
``absmax`` input is float32, a double-quantized absmax expanded by
:func:`graphlora.quant.ops.dequantize_double_quant`.

graphlora's NF4 blocks are more general (any group size, a shorter last block, one absmax per
row or per tensor), and every one whose group size is a multiple of 16, or covers a whole row,
is re-expressed exactly: a MatMulBnb4 block ``b`` (16..256) that divides the group gets the
group's absmax repeated once per ``b`` codes; a row whose length ``b`` does not divide is padded
to one that it does, with the code of 0.0 in ``B`` and zeros appended to the activation by a
``Pad``; a float16/bfloat16 model casts the activation to float32 around the MatMulBnb4. A
group size that is not a multiple of 16 and shorter than a row has no such form, and transform
refuses it (:func:`bnb_block_problem`, checked when rules are matched).
"""

from __future__ import annotations

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
    replace_value,
    require_const,
    unique_node_name,
    where,
)
from graphlora.onnx.qdq_types import float_array, float_type, to_torch
from graphlora.onnx.weight_lowering import flip, gemm_as_matmul, weight_uses
from graphlora.quant.bnb_blocks import bnb_absmax, bnb_block_problem, bnb_codes, bnb_layout
from graphlora.quant.ops import dequantize_double_quant
from graphlora.quant.packing import pack_4bit, unpack_4bit

MS_DOMAIN = "com.microsoft"


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
    group = attr(node, "block_size")
    name = base_name(node)
    described = f"{where(node)} ({name})"
    if len(shape) != 2:
        raise ExportError(f"NF4 weight {described}: only 2-D weights lower to MatMulBnb4")
    c = shape[axis]
    k = shape[1 - axis]
    group = None if group is None else int(group)
    problem = bnb_block_problem(group, k)
    if problem is not None:
        raise ExportError(f"NF4 weight {described}: {problem}")
    block, padded_k = bnb_layout(group, k)
    codes = bnb_codes(unpack_4bit(packed, k, signed=False), k, group)  # (C, K') = (N, K')
    bnb = pack_4bit(codes.reshape(-1), signed=False, high_first=True)
    expanded = bnb_absmax(absmax, c, group, k)
    compute = float_type(attr(node, "dtype"))
    b_val = add_initializer(graph, f"{name}.nf4", bnb.numpy())
    a_val = add_initializer(graph, f"{name}.absmax",
                            float_array(expanded, ir.DataType.FLOAT))
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
        x = _activation(graph, consumer, name, compute, padded_k - k)
        bnb4 = ir.node(
            "MatMulBnb4", [x, b_val, a_val],
            attributes={"K": padded_k, "N": c, "block_size": block, "quant_type": 1},
            domain=MS_DOMAIN, name=unique_node_name(graph, f"{name}/MatMulBnb4"),
        )
        new_out = bnb4.outputs[0]
        old_out = consumer.outputs[0]
        new_out.name = bnb4.name + ":0"
        copy_type(old_out, new_out, default=ir.DataType.FLOAT)
        graph.insert_before(consumer, bnb4)
        if compute != ir.DataType.FLOAT:
            new_out.dtype = ir.DataType.FLOAT
            new_out = _cast(graph, new_out, compute, f"{name}/MatMulBnb4_out", consumer)
            copy_type(old_out, new_out)
        replace_value(old_out, new_out)
        graph.remove(consumer, safe=True)
    graph.opset_imports.setdefault(MS_DOMAIN, 1)


def _activation(graph: ir.Graph, matmul: ir.Node, name: str, compute: ir.DataType, pad: int) -> ir.Value:
    """The MatMul's activation as MatMulBnb4 reads it: float32 (cast from a float16/bfloat16
    model), with ``pad`` zeros appended to its last axis when the row was padded."""
    x = matmul.inputs[0]
    if compute != ir.DataType.FLOAT:
        x = _cast(graph, x, ir.DataType.FLOAT, f"{name}/MatMulBnb4_in", matmul)
    if pad:
        pads = add_initializer(graph, f"{name}.nf4_pads", np.array([0, pad], dtype=np.int64))
        zero = add_initializer(graph, f"{name}.nf4_pad_value", np.zeros((), dtype=np.float32))
        axes = add_initializer(graph, f"{name}.nf4_pad_axes", np.array([-1], dtype=np.int64))
        node = ir.node("Pad", [x, pads, zero, axes], name=unique_node_name(graph, f"{name}/Pad"))
        graph.insert_before(matmul, node)
        out = node.outputs[0]
        out.name = node.name + ":0"
        out.dtype = ir.DataType.FLOAT
        x = out
    return x


def _cast(graph: ir.Graph, value: ir.Value, to: ir.DataType, base: str, before: ir.Node) -> ir.Value:
    node = ir.node("Cast", [value], attributes={"to": to}, name=unique_node_name(graph, base))
    graph.insert_before(before, node)
    out = node.outputs[0]
    out.name = node.name + ":0"
    out.dtype = to
    return out
