"""Lower the ``pkg.graphlora`` dialect to standard ONNX: the one place that knows the mapping.

===========================================  ===========================================================
graphlora op (dialect node)                  ONNX after lowering
===========================================  ===========================================================
``dequantize_packed4`` (int4/uint4)          ``INT4``/``UINT4`` initializer -> ``DequantizeLinear``
                                             (opset 21; blocked: ``axis`` = the blocked axis,
                                             ``block_size``; per-channel: ``axis``; per-tensor)
``dequantize`` (int8/uint8/int16 codes)      integer initializer -> ``DequantizeLinear``
``dequantize_fp8``                           ``FLOAT8E4M3FN`` initializer -> ``DequantizeLinear``
``fake_quantize`` of a constant (LoRA A/B)   integer initializer (codes computed here, exactly as
                                             graphlora rounds) -> ``DequantizeLinear``
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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graphlora.errors import ExportError
from graphlora.onnx.dialect import DOMAIN

MS_DOMAIN = "com.microsoft"

# (qmin, qmax) -> ONNX integer type whose full range it is
_FULL_RANGE = {
    (-8, 7): ir.DataType.INT4,
    (0, 15): ir.DataType.UINT4,
    (-128, 127): ir.DataType.INT8,
    (0, 255): ir.DataType.UINT8,
    (-32768, 32767): ir.DataType.INT16,
    (0, 65535): ir.DataType.UINT16,
}
_NUMPY = {
    ir.DataType.INT4: ml_dtypes.int4,
    ir.DataType.UINT4: ml_dtypes.uint4,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.INT16: np.int16,
    ir.DataType.UINT16: np.uint16,
    ir.DataType.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn,
}
_FLOAT_NUMPY = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.BFLOAT16: ml_dtypes.bfloat16,
    ir.DataType.DOUBLE: np.float64,
}
#: the lowest opset that can express each stored type in QuantizeLinear/DequantizeLinear
MIN_OPSET = {
    ir.DataType.INT4: 21, ir.DataType.UINT4: 21, ir.DataType.INT16: 21, ir.DataType.UINT16: 21,
    ir.DataType.FLOAT8E4M3FN: 19, ir.DataType.INT8: 13, ir.DataType.UINT8: 13,
}


def _smallest_int_type(qmin: int, qmax: int) -> ir.DataType:
    for (lo, hi), dtype in _FULL_RANGE.items():
        if lo <= qmin and qmax <= hi:
            return dtype
    raise ExportError(f"no ONNX integer type holds the code range [{qmin}, {qmax}]")


# ----------------------------------------------------------------------------- weight record
@dataclass
class QuantWeight:
    """A quantized weight in graphlora's canonical form, ready to be laid out for a consumer.

    ``codes`` is the ``(C, K)`` matrix (channel axis first) of integer codes (int32) or fp8
    values; ``scale``/``zero_point`` are ``()``, ``(C,)`` or ``(C, n_blocks)`` float32/int32.
    ``shape``/``axis`` describe the parameter as the graph reads it (``axis`` = its channel axis).
    """

    name: str
    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
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
        return "channel" if self.scale.ndim == 1 else "tensor"

    @property
    def param_orientation(self) -> str:
        """``ck`` when the parameter is stored channel-first, ``kc`` when channel-last."""
        if len(self.shape) != 2:
            return "nd"
        return "ck" if self.axis == 0 else "kc"


def _flip(orientation: str) -> str:
    return {"ck": "kc", "kc": "ck"}[orientation]


# ----------------------------------------------------------------------------- graph helpers
def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        return None
    return tensor.numpy()


def _require_const(node: ir.Node, index: int, what: str) -> np.ndarray:
    value = node.inputs[index] if index < len(node.inputs) else None
    array = _const(value)
    if array is None:
        raise ExportError(
            f"graphlora::{node.op_type} ({_where(node)}): its {what} must be a constant (a model "
            f"buffer), but it is computed in the graph; export cannot store it quantized"
        )
    return array


def _where(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op_type)


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _unique_name(graph: ir.Graph, base: str) -> str:
    taken = graph.initializers
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    return name


def _initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    tensor = ir.tensor(array, dtype=dtype, name=_unique_name(graph, name))
    value = ir.Value(name=tensor.name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def _float_out(dtype_attr: int | None) -> ir.DataType:
    return ir.DataType(dtype_attr) if dtype_attr is not None else ir.DataType.FLOAT


def _to_canonical(array: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(array, axis, 0)
    return moved.reshape(moved.shape[0], -1)


def _from_canonical(array: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    moved = [shape[axis]] + [d for i, d in enumerate(shape) if i != axis]
    return np.moveaxis(array.reshape(moved), 0, axis)


def _unpack4(packed: np.ndarray, k: int, signed: bool) -> np.ndarray:
    low = (packed & 0x0F).astype(np.int32)
    high = (packed >> 4).astype(np.int32)
    codes = np.stack((low, high), axis=-1).reshape(packed.shape[0], -1)[:, :k]
    if signed:
        codes = np.where(codes >= 8, codes - 16, codes)
    return codes


def _expand(param: np.ndarray, c: int, k: int, block_size: int | None) -> np.ndarray:
    """A canonical parameter broadcast to the (C, K) matrix."""
    if param.ndim == 0:
        return np.broadcast_to(param, (c, k))
    if param.ndim == 1:
        return np.broadcast_to(param[:, None], (c, k))
    return np.repeat(param, block_size, axis=1)[:, :k]


def _round_half_even(x: np.ndarray) -> np.ndarray:
    return np.rint(x)  # numpy rounds half to even, like torch.round and ONNX QuantizeLinear


# ----------------------------------------------------------------------------- weight readers
def _weight_packed4(node: ir.Node) -> QuantWeight:
    packed = _require_const(node, 0, "packed weight")
    scale = _require_const(node, 1, "scale").astype(np.float32)
    zp = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    shape = tuple(int(d) for d in _attr(node, "shape"))
    axis = int(_attr(node, "axis")) % len(shape)
    block = _attr(node, "block_size")
    signed = bool(_attr(node, "signed"))
    c = shape[axis]
    k = math.prod(shape) // c
    codes = _unpack4(packed.astype(np.uint8), k, signed)
    return QuantWeight(
        name=_base_name(node), codes=codes, scale=scale,
        zero_point=None if zp is None else zp.astype(np.int32),
        qtype=ir.DataType.INT4 if signed else ir.DataType.UINT4,
        block_size=None if block is None else int(block), shape=shape, axis=axis,
        out_dtype=_float_out(_attr(node, "dtype")), where=_where(node),
    )


def _weight_dequantize(node: ir.Node) -> QuantWeight:
    q = _require_const(node, 0, "codes")
    scale = _require_const(node, 1, "scale").astype(np.float32)
    zp = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    axis = _attr(node, "axis")
    block = _attr(node, "block_size")
    axis = 0 if axis is None or scale.ndim == 0 else int(axis) % q.ndim
    qtype = {np.dtype(np.int8): ir.DataType.INT8, np.dtype(np.uint8): ir.DataType.UINT8,
             np.dtype(np.int16): ir.DataType.INT16, np.dtype(np.int32): ir.DataType.UINT16}.get(q.dtype)
    if qtype is None:
        raise ExportError(f"graphlora::dequantize ({_where(node)}): codes of dtype {q.dtype} have no "
                          "ONNX QDQ type")
    if qtype == ir.DataType.UINT16 and (q.min() < 0 or q.max() > 65535):
        raise ExportError(f"graphlora::dequantize ({_where(node)}): int32 codes outside uint16")
    return QuantWeight(
        name=_base_name(node), codes=_to_canonical(q.astype(np.int32), axis), scale=scale,
        zero_point=None if zp is None else zp.astype(np.int32), qtype=qtype,
        block_size=None if block is None else int(block), shape=tuple(q.shape), axis=axis,
        out_dtype=_float_out(_attr(node, "dtype")), where=_where(node),
    )


def _weight_fp8(node: ir.Node) -> QuantWeight:
    q = _require_const(node, 0, "fp8 weight")
    scale = _require_const(node, 1, "scale").astype(np.float32)
    axis = _attr(node, "axis")
    axis = 0 if axis is None or scale.ndim == 0 else int(axis) % q.ndim
    return QuantWeight(
        name=_base_name(node), codes=_to_canonical(q, axis), scale=scale, zero_point=None,
        qtype=ir.DataType.FLOAT8E4M3FN, block_size=None, shape=tuple(q.shape), axis=axis,
        out_dtype=_float_out(_attr(node, "dtype")), where=_where(node),
    )


def _weight_fake_quantized(node: ir.Node, x: np.ndarray) -> QuantWeight:
    """Codes of a constant under ``fake_quantize``: computed here exactly as graphlora does."""
    scale = _require_const(node, 1, "scale").astype(np.float32)
    zp_in = node.inputs[2] if len(node.inputs) > 2 else None
    zp = _const(zp_in) if zp_in is not None else None
    if zp_in is not None and zp is None:
        raise ExportError(f"graphlora::fake_quantize ({_where(node)}): zero point must be constant")
    qmin, qmax = int(_attr(node, "qmin")), int(_attr(node, "qmax"))
    axis = _attr(node, "axis")
    block = _attr(node, "block_size")
    axis = 0 if axis is None or scale.ndim == 0 else int(axis) % x.ndim
    canon = _to_canonical(x.astype(np.float32), axis)
    c, k = canon.shape
    s = _expand(scale, c, k, block)
    q = _round_half_even(canon / s)
    if zp is not None:
        q = q + _expand(zp.astype(np.float32), c, k, block)
    codes = np.clip(q, qmin, qmax).astype(np.int32)
    dtype = x.dtype
    out = {np.dtype(np.float32): ir.DataType.FLOAT, np.dtype(np.float16): ir.DataType.FLOAT16}.get(
        dtype, ir.DataType.FLOAT)
    return QuantWeight(
        name=_base_name(node, x_name=node.inputs[0].name), codes=codes, scale=scale,
        zero_point=None if zp is None else zp.astype(np.int32), qtype=_smallest_int_type(qmin, qmax),
        block_size=None if block is None else int(block), shape=tuple(x.shape), axis=axis,
        out_dtype=out, where=_where(node),
    )


def _base_name(node: ir.Node, x_name: str | None = None) -> str:
    """A readable initializer name: the parameter's name from the buffer names."""
    name = x_name or (node.inputs[0].name if node.inputs and node.inputs[0] is not None else "w")
    for prefix in ("graphlora_quant.weight.", "graphlora_quant.", "graphlora_export."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    last = name.rsplit(".", 1)
    if len(last) == 2 and last[1] in ("packed", "q", "codes", "storage", "x"):
        name = last[0]
    return name


# ----------------------------------------------------------------------------- emission
def _layout(qw: QuantWeight, orientation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """(codes, scale, zero point, DequantizeLinear attributes) of ``qw`` in ``orientation``."""
    scale, zp = qw.scale, qw.zero_point
    if orientation == "nd":
        codes = _from_canonical(qw.codes, qw.shape, qw.axis)
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


def _typed(array: np.ndarray, qtype: ir.DataType) -> np.ndarray:
    if qtype == ir.DataType.FLOAT8E4M3FN:
        return np.ascontiguousarray(array).astype(ml_dtypes.float8_e4m3fn)
    return np.ascontiguousarray(array).astype(_NUMPY[qtype])


def emit_dequantize(graph: ir.Graph, qw: QuantWeight, orientation: str, before: ir.Node) -> ir.Value:
    """A ``DequantizeLinear`` producing ``qw`` in ``orientation``, inserted before ``before``."""
    key = orientation
    if key not in qw._cache:
        codes, scale, zp, attrs = _layout(qw, orientation)
        suffix = "" if orientation in ("nd", qw.param_orientation) else "_t"
        q_val = _initializer(graph, f"{qw.name}.quantized{suffix}", _typed(codes, qw.qtype))
        s_val = _initializer(graph, f"{qw.name}.scale{suffix}",
                             np.ascontiguousarray(scale).astype(_FLOAT_NUMPY[qw.out_dtype]))
        z_val = None if zp is None else _initializer(graph, f"{qw.name}.zero_point{suffix}",
                                                     _typed(zp, qw.qtype))
        qw._cache[key] = (q_val, s_val, z_val, attrs, codes.shape)
    q_val, s_val, z_val, attrs, shape = qw._cache[key]
    inputs = [q_val, s_val] + ([z_val] if z_val is not None else [])
    node = ir.node("DequantizeLinear", inputs, attributes=attrs,
                   name=_unique_node_name(graph, f"{qw.name}/DequantizeLinear"))
    out = node.outputs[0]
    out.name = node.name + ":0"
    out.dtype = qw.out_dtype
    out.shape = ir.Shape(shape)
    graph.insert_before(before, node)
    return out


_NODE_NAMES: dict[int, set] = {}


def _unique_node_name(graph: ir.Graph, base: str) -> str:
    names = _NODE_NAMES.setdefault(id(graph), {n.name for n in graph})
    name, i = base, 1
    while name in names:
        name = f"{base}_{i}"
        i += 1
    names.add(name)
    return name


# ----------------------------------------------------------------------------- consumers
@dataclass
class WeightUse:
    """One consumer of a weight: ``node.inputs[index]`` sees the parameter transposed or not."""

    node: ir.Node
    index: int
    transposed: bool


def _is_2d_transpose(node: ir.Node) -> bool:
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return False
    perm = _attr(node, "perm")
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


def _is(node: ir.Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


def _gemm_as_matmul(graph: ir.Graph, gemm: ir.Node, b: ir.Value) -> tuple[ir.Node, int]:
    """Replace ``Gemm(A, W, C)`` (alpha=beta=1, no transA) by ``MatMul(A, b) [+ Add(C)]``.

    Returns the MatMul and the weight's input index (1).
    """
    if _attr(gemm, "transA", 0) or _attr(gemm, "alpha", 1.0) != 1.0 or (
        len(gemm.inputs) > 2 and gemm.inputs[2] is not None and _attr(gemm, "beta", 1.0) != 1.0
    ):
        raise ExportError(f"Gemm {_where(gemm)} with transA/alpha/beta reads a quantized weight; "
                          "only plain linear layers are supported")
    a = gemm.inputs[0]
    matmul = ir.node("MatMul", [a, b], name=_unique_node_name(graph, f"{gemm.name}/MatMul"))
    nodes = [matmul]
    result = matmul.outputs[0]
    result.name = matmul.name + ":0"
    old_out = gemm.outputs[0]
    _copy_type(old_out, result)
    if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
        add = ir.node("Add", [result, gemm.inputs[2]], name=_unique_node_name(graph, f"{gemm.name}/Add"))
        nodes.append(add)
        result = add.outputs[0]
        result.name = add.name + ":0"
        _copy_type(old_out, result)
    graph.insert_before(gemm, nodes)
    replace_value(old_out, result)
    graph.remove(gemm, safe=True)
    return matmul, 1


def _copy_type(src: ir.Value, dst: ir.Value, default: ir.DataType | None = None) -> None:
    dtype = src.dtype if src.dtype is not None else default
    if dtype is not None:
        dst.dtype = dtype
    if src.shape is not None:
        dst.shape = src.shape.copy()


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Make every reader of ``old`` read ``new``; a graph output keeps its name."""
    name = old.name
    is_output = old.is_graph_output()
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if is_output and name:
        old.name = f"{name}__replaced"
        new.name = name


def _matmul_orientation(qw: QuantWeight, use: WeightUse) -> str:
    base = qw.param_orientation
    return _flip(base) if use.transposed else base


def _lower_weight(graph: ir.Graph, node: ir.Node, qw: QuantWeight) -> None:
    """Feed every consumer of a weight dialect node its own DequantizeLinear."""
    if len(qw.shape) != 2:
        for use in weight_uses(node.outputs[0], len(qw.shape)):
            if use.transposed:
                raise ExportError(f"{qw.where}: transposed use of a {len(qw.shape)}-D quantized weight")
            use.node.replace_input_with(use.index, emit_dequantize(graph, qw, "nd", use.node))
        return
    for use in weight_uses(node.outputs[0], 2):
        consumer, index, orientation = use.node, use.index, _matmul_orientation(qw, use)
        if _is(consumer, "Gemm") and index == 1:
            if _attr(consumer, "transB", 0):
                orientation = _flip(orientation)
            b = emit_dequantize(graph, qw, orientation, consumer)
            _gemm_as_matmul(graph, consumer, b)
            continue
        if _is(consumer, "Gemm") and index == 0 and _attr(consumer, "transA", 0):
            orientation = _flip(orientation)
        consumer.replace_input_with(index, emit_dequantize(graph, qw, orientation, consumer))


def _check_opset(qw: QuantWeight, opset: int) -> None:
    need = MIN_OPSET.get(qw.qtype, 21)
    if qw.granularity == "block":
        need = max(need, 21)
    if opset < need:
        what = "blocked " if qw.granularity == "block" else ""
        raise ExportError(
            f"{qw.where} ({qw.name}): {what}{qw.qtype.name} DequantizeLinear needs opset >= {need}, "
            f"export was asked for opset {opset}; use opset={max(need, 21)}"
        )


# ----------------------------------------------------------------------------- NF4
_BNB_BLOCKS = (16, 32, 64, 128, 256)


def _lower_nf4(graph: ir.Graph, node: ir.Node) -> None:
    packed = _require_const(node, 0, "packed weight").astype(np.uint8)
    double = node.op_type == "dequantize_nf4_dq"
    shape = tuple(int(d) for d in _attr(node, "shape"))
    axis = int(_attr(node, "axis")) % len(shape)
    if double:
        absmax_q = _require_const(node, 1, "absmax codes").astype(np.float32)
        s2 = _require_const(node, 2, "absmax scale").astype(np.float32)
        mean = _require_const(node, 3, "absmax mean").astype(np.float32)
        bs2 = int(_attr(node, "absmax_block_size"))
        flat = absmax_q.reshape(-1)
        absmax = (flat * np.repeat(s2, bs2)[: flat.size] + mean).reshape(absmax_q.shape)
    else:
        absmax = _require_const(node, 1, "absmax").astype(np.float32)
    block = _attr(node, "block_size")
    where = f"{_where(node)} ({_base_name(node)})"
    if len(shape) != 2:
        raise ExportError(f"NF4 weight {where}: only 2-D weights lower to MatMulBnb4")
    c = shape[axis]
    k = shape[1 - axis]
    if block is None:
        if absmax.ndim != 1:
            raise ExportError(f"NF4 weight {where}: per-tensor NF4 has no MatMulBnb4 layout")
        block = k
    block = int(block)
    if block not in _BNB_BLOCKS or k % block:
        raise ExportError(
            f"NF4 weight {where}: MatMulBnb4 needs a block size in {_BNB_BLOCKS} dividing the input "
            f"features ({k}); got {block}"
        )
    codes = _unpack4(packed, k, signed=False).astype(np.uint8)  # (C, K) = (N, K)
    flat = codes.reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    bnb = ((flat[0::2] << 4) | flat[1::2]).astype(np.uint8)  # bitsandbytes: first code HIGH nibble
    out_dtype = _float_out(_attr(node, "dtype"))
    if out_dtype != ir.DataType.FLOAT:
        raise ExportError(f"NF4 weight {where}: onnxruntime's CPU MatMulBnb4 takes float32 only")
    name = _base_name(node)
    b_val = _initializer(graph, f"{name}.nf4", bnb)
    a_val = _initializer(graph, f"{name}.absmax", absmax.reshape(-1).astype(np.float32))
    param = "ck" if axis == 0 else "kc"
    for use in weight_uses(node.outputs[0], 2):
        consumer, index = use.node, use.index
        orientation = _flip(param) if use.transposed else param
        if _is(consumer, "Gemm") and index == 1:
            if _attr(consumer, "transB", 0):
                orientation = _flip(orientation)
            b = node.outputs[0]  # placeholder, replaced below
            consumer, index = _gemm_as_matmul(graph, consumer, b)
        if not (_is(consumer, "MatMul") and index == 1):
            raise ExportError(
                f"NF4 weight {where} is read by {consumer.op_type}, not as a MatMul weight; NF4 "
                "lowers only to onnxruntime's MatMulBnb4"
            )
        if orientation != "kc":
            raise ExportError(f"NF4 weight {where}: the MatMul reads it with blocks along N; "
                              "MatMulBnb4 needs blocks along K")
        bnb4 = ir.node(
            "MatMulBnb4", [consumer.inputs[0], b_val, a_val],
            attributes={"K": k, "N": c, "block_size": block, "quant_type": 1},
            domain=MS_DOMAIN, name=_unique_node_name(graph, f"{name}/MatMulBnb4"),
        )
        new_out = bnb4.outputs[0]
        old_out = consumer.outputs[0]
        new_out.name = bnb4.name + ":0"
        _copy_type(old_out, new_out, default=ir.DataType.FLOAT)
        graph.insert_before(consumer, bnb4)
        replace_value(old_out, new_out)
        graph.remove(consumer, safe=True)
    graph.opset_imports.setdefault(MS_DOMAIN, 1)


# ----------------------------------------------------------------------------- activations
def _lower_fake_quantize_activation(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    x = node.inputs[0]
    qmin, qmax = int(_attr(node, "qmin")), int(_attr(node, "qmax"))
    qtype = _FULL_RANGE.get((qmin, qmax))
    if qtype is None:
        raise ExportError(
            f"activation fake-quant {_where(node)}: code range [{qmin}, {qmax}] is not the full range "
            "of an ONNX integer type, which QuantizeLinear always saturates to; calibrate with the "
            "full range (e.g. [0, 255] for uint8, [-128, 127] for int8)"
        )
    if opset < MIN_OPSET.get(qtype, 21):
        raise ExportError(f"activation fake-quant {_where(node)}: {qtype.name} QuantizeLinear needs "
                          f"opset >= {MIN_OPSET[qtype]}, export was asked for opset {opset}")
    q, dq = _qdq_nodes(graph, node, qtype)
    graph.insert_before(node, [q, dq])
    out = dq.outputs[0]
    out.name = dq.name + ":0"
    _copy_type(x, out)
    replace_value(node.outputs[0], out)


def _qdq_nodes(graph: ir.Graph, node: ir.Node, qtype: ir.DataType) -> tuple[ir.Node, ir.Node]:
    x = node.inputs[0]
    scale = _require_const(node, 1, "scale")
    zp_in = node.inputs[2] if len(node.inputs) > 2 else None
    zp = _const(zp_in) if zp_in is not None else None
    if zp_in is not None and zp is None:
        raise ExportError(f"fake-quant {_where(node)}: the zero point must be constant")
    if zp is None:
        zp = np.zeros(scale.shape, np.int32)
    float_dtype = x.dtype if x.dtype in _FLOAT_NUMPY else ir.DataType.FLOAT
    axis, block = _attr(node, "axis"), _attr(node, "block_size")
    attrs = {}
    if scale.ndim >= 1:
        attrs["axis"] = int(axis if axis is not None else 1)
        if block is not None:
            raise ExportError(f"fake-quant {_where(node)}: blocked activation quantization "
                              "is not supported by onnxruntime's QuantizeLinear fusions")
    base = _base_name(node, x_name=(zp_in.name if zp_in is not None else node.inputs[1].name))
    base = base.rsplit(".", 1)[0] if base.endswith((".scale", ".zero_point")) else base
    s_val = _initializer(graph, f"{base}.scale", scale.astype(_FLOAT_NUMPY[float_dtype]))
    z_val = _initializer(graph, f"{base}.zero_point", _typed(zp, qtype))
    q = ir.node("QuantizeLinear", [x, s_val, z_val], attributes=attrs,
                name=_unique_node_name(graph, f"{base}/QuantizeLinear"))
    q.outputs[0].name = q.name + ":0"
    q.outputs[0].dtype = qtype
    if x.shape is not None:
        q.outputs[0].shape = x.shape
    dq = ir.node("DequantizeLinear", [q.outputs[0], s_val, z_val], attributes=attrs,
                 name=_unique_node_name(graph, f"{base}/DequantizeLinear"))
    return q, dq


def _lower_quantize(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    qmin, qmax = int(_attr(node, "qmin")), int(_attr(node, "qmax"))
    qtype = _FULL_RANGE.get((qmin, qmax))
    if qtype is None:
        raise ExportError(f"graphlora::quantize {_where(node)}: range [{qmin}, {qmax}] is not a full "
                          "ONNX integer type range")
    q, _ = _qdq_nodes(graph, node, qtype)
    graph.insert_before(node, q)
    replace_value(node.outputs[0], q.outputs[0])


def _lower_quantize_fp8(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    if opset < 19:
        raise ExportError(f"graphlora::quantize_fp8 {_where(node)}: float8 needs opset >= 19")
    scale = _require_const(node, 1, "scale").astype(np.float32)
    axis = _attr(node, "axis")
    zp = _initializer(graph, f"{_base_name(node)}.fp8_zero_point",
                      np.zeros(scale.shape, ml_dtypes.float8_e4m3fn))
    s_val = _initializer(graph, f"{_base_name(node)}.scale", scale)
    attrs = {"axis": int(axis)} if scale.ndim else {}
    q = ir.node("QuantizeLinear", [node.inputs[0], s_val, zp], attributes=attrs,
                name=_unique_node_name(graph, f"{_base_name(node)}/QuantizeLinear"))
    q.outputs[0].name = q.name + ":0"
    graph.insert_before(node, q)
    replace_value(node.outputs[0], q.outputs[0])


# ----------------------------------------------------------------------------- driver
@dataclass
class LoweringReport:
    """What the lowering did, for logs and tests."""

    weights: dict[str, str] = field(default_factory=dict)  # initializer base name -> qtype
    activations: int = 0
    contrib_ops: list[str] = field(default_factory=list)
    #: MatMuls onnxruntime has no fused kernel for (e.g. 4-bit weights with quantized activations)
    unfused: list[str] = field(default_factory=list)


def required_opset(gm) -> list[tuple[str, int]]:
    """``(where, opset)`` for every graphlora op in an FX graph needing more than opset 18, so
    export can refuse an opset before spending time in torch.onnx."""
    import torch

    from graphlora import meta
    from graphlora.quant.ops import OPS

    needs = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in OPS.values():
            continue
        info = meta.info(node)
        where = info.get("tensor") or info.get("module_path") or node.name
        name = node.target._opname
        if name == "dequantize_packed4":
            needs.append((f"{where} (4-bit weight)", 21))
        elif name in ("dequantize", "fake_quantize", "quantize"):
            block = node.args[4] if len(node.args) > 4 else None
            if block is not None:
                needs.append((f"{where} (blocked quantization)", 21))
            if name == "dequantize":
                q = node.args[0]
                val = q.meta.get("val") if hasattr(q, "meta") else None
                if val is not None and val.dtype in (torch.int16, torch.int32):
                    needs.append((f"{where} (16-bit codes)", 21))
            else:
                qmin, qmax = node.args[5], node.args[6]
                dtype = _smallest_int_type(int(qmin), int(qmax))
                if MIN_OPSET.get(dtype, 21) > 18:
                    needs.append((f"{where} ({dtype.name.lower()})", MIN_OPSET.get(dtype, 21)))
        elif name in ("dequantize_fp8", "quantize_fp8"):
            needs.append((f"{where} (float8)", 19))
    return needs


def _lower_fake_quantize(graph: ir.Graph, node: ir.Node, opset: int, report: LoweringReport) -> None:
    x = _const(node.inputs[0])
    if x is None:
        _lower_fake_quantize_activation(graph, node, opset)
        report.activations += 1
        return
    qw = _weight_fake_quantized(node, x)
    _check_opset(qw, opset)
    _lower_weight(graph, node, qw)
    report.weights[qw.name] = qw.qtype.name


def _weight_lowering(reader: Callable[[ir.Node], QuantWeight]):
    def lower(graph: ir.Graph, node: ir.Node, opset: int, report: LoweringReport) -> None:
        qw = reader(node)
        _check_opset(qw, opset)
        _lower_weight(graph, node, qw)
        report.weights[qw.name] = qw.qtype.name

    return lower


def _nf4(graph, node, opset, report):
    _lower_nf4(graph, node)
    report.weights[_base_name(node)] = "nf4"
    report.contrib_ops.append("MatMulBnb4")


def _plain(fn):
    def lower(graph, node, opset, report):
        fn(graph, node, opset)

    return lower


#: dialect op name -> lowering function (graph, node, opset, report)
LOWERINGS: dict[str, Callable] = {
    "dequantize_packed4": _weight_lowering(_weight_packed4),
    "dequantize": _weight_lowering(_weight_dequantize),
    "dequantize_fp8": _weight_lowering(_weight_fp8),
    "fake_quantize": _lower_fake_quantize,
    "dequantize_nf4": _nf4,
    "dequantize_nf4_dq": _nf4,
    "quantize": _plain(_lower_quantize),
    "quantize_fp8": _plain(_lower_quantize_fp8),
}


def lower_model(model: ir.Model, *, opset: int) -> LoweringReport:
    """Rewrite every ``pkg.graphlora`` node of ``model`` (in place) into standard ONNX."""
    graph = model.graph
    _NODE_NAMES.pop(id(graph), None)
    report = LoweringReport()
    for node in list(graph):
        if node.domain != DOMAIN:
            continue
        lower = LOWERINGS.get(node.op_type)
        if lower is None:
            raise ExportError(f"no ONNX lowering for graphlora::{node.op_type} ({_where(node)})")
        lower(graph, node, opset, report)
    _remove_dead(graph)
    report.unfused = _unfusable_matmuls(graph)
    graph.opset_imports.pop(DOMAIN, None)
    model.opset_imports.pop(DOMAIN, None)
    leftover = [n.op_type for n in graph if n.domain == DOMAIN]
    if leftover:
        raise ExportError(f"graphlora dialect nodes left after lowering: {sorted(set(leftover))}")
    _NODE_NAMES.pop(id(graph), None)
    return report


def _unfusable_matmuls(graph: ir.Graph) -> list[str]:
    """MatMuls reading a 4-bit weight *and* a dequantized activation: onnxruntime has no static
    W4A8 kernel, so they run in float (the activation QDQ is still honoured)."""
    found = []
    for node in graph:
        if not _is(node, "MatMul") or len(node.inputs) < 2:
            continue
        a, b = (v.producer() if v is not None else None for v in node.inputs[:2])
        if (a is not None and _is(a, "DequantizeLinear") and b is not None
                and _is(b, "DequantizeLinear") and b.inputs[0].dtype in (ir.DataType.INT4, ir.DataType.UINT4)):
            found.append(b.inputs[0].name)
    return found


def _remove_dead(graph: ir.Graph) -> None:
    """Drop nodes whose outputs nobody reads, and unused initializers."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if any(out.uses() or out.is_graph_output() for out in node.outputs):
                continue
            graph.remove(node, safe=True)
            changed = True
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]
