"""ONNX types of quantized tensors, and the torch <-> ONNX array crossings of the lowering.

The lowering reads a dialect node's constants as numpy arrays, hands them to
:mod:`graphlora.quant` as torch tensors (:func:`to_torch`) and stores what comes back as ONNX
initializers (:func:`code_tensor`, :func:`float_array`). The crossings only re-type: every code,
scale, zero point and packed nibble is the value graphlora computed. 4-bit initializers are packed
by :func:`graphlora.quant.packing.pack_4bit` over the flattened tensor, which is ONNX's ``INT4``/
``UINT4`` layout.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from graphlora.errors import ExportError
from graphlora.quant.packing import pack_4bit

#: (qmin, qmax) -> ONNX integer type whose full range it is
FULL_RANGE = {
    (-8, 7): ir.DataType.INT4,
    (0, 15): ir.DataType.UINT4,
    (-128, 127): ir.DataType.INT8,
    (0, 255): ir.DataType.UINT8,
    (-32768, 32767): ir.DataType.INT16,
    (0, 65535): ir.DataType.UINT16,
}
_CODE_NUMPY = {
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.INT16: np.int16,
    ir.DataType.UINT16: np.uint16,
}
FLOAT_NUMPY = {
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
# dtypes torch.from_numpy / Tensor.numpy do not cross: (numpy dtype, torch dtype, the same-width
# integer both sides view them as)
_VIEWED = (
    (np.dtype(ml_dtypes.float8_e4m3fn), torch.float8_e4m3fn, np.uint8, torch.uint8),
    (np.dtype(ml_dtypes.bfloat16), torch.bfloat16, np.int16, torch.int16),
)


def smallest_int_type(qmin: int, qmax: int) -> ir.DataType:
    """The narrowest ONNX integer type holding codes in ``[qmin, qmax]``."""
    for (lo, hi), dtype in FULL_RANGE.items():
        if lo <= qmin and qmax <= hi:
            return dtype
    raise ExportError(f"no ONNX integer type holds the code range [{qmin}, {qmax}]")


def float_type(dtype_attr: int | None) -> ir.DataType:
    """The float type a dialect op's ``dtype`` attribute names (float32 when absent)."""
    return ir.DataType(dtype_attr) if dtype_attr is not None else ir.DataType.FLOAT


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A torch tensor of a constant's array, bit for bit (float8 and bfloat16 included)."""
    if not array.flags.writeable:  # torch would warn: it cannot share read-only memory safely
        array = array.copy()
    for np_dtype, dtype, np_int, _ in _VIEWED:
        if array.dtype == np_dtype:
            return torch.from_numpy(array.view(np_int)).view(dtype)
    return torch.from_numpy(array)


def at_least_1d(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, a 0-d one reshaped to ``(1,)``: export has always stored per-tensor weight
    scales and zero points with one element (onnxruntime reads both as per-tensor)."""
    return tensor.reshape(1) if tensor.dim() == 0 else tensor


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_torch`: a contiguous numpy array of ``tensor``, bit for bit."""
    tensor = tensor.detach().contiguous()
    for np_dtype, dtype, _, torch_int in _VIEWED:
        if tensor.dtype == dtype:
            return tensor.view(torch_int).numpy().view(np_dtype)
    return tensor.numpy()


def code_tensor(codes: torch.Tensor, qtype: ir.DataType) -> ir.TensorProtocol:
    """An ONNX tensor of integer (or float8) codes in ``qtype``, same shape and values.

    4-bit codes are packed by graphlora's :func:`~graphlora.quant.packing.pack_4bit` (low nibble
    first over the flattened tensor, ONNX's layout), so the file holds graphlora's bytes. A 0-d
    tensor (a per-tensor zero point) is stored with one element, shape ``(1,)``, as export always
    has.
    """
    codes = at_least_1d(codes.detach()).contiguous()
    if qtype in (ir.DataType.INT4, ir.DataType.UINT4):
        packed = pack_4bit(codes.reshape(-1), signed=qtype == ir.DataType.INT4)
        return ir.PackedTensor(packed.numpy(), qtype, shape=ir.Shape(codes.shape))
    if qtype == ir.DataType.FLOAT8E4M3FN:
        if codes.dtype != torch.float8_e4m3fn:
            raise ExportError(f"float8 codes must be torch.float8_e4m3fn, got {codes.dtype}")
        return ir.tensor(to_numpy(codes))
    return ir.tensor(to_numpy(codes).astype(_CODE_NUMPY[qtype]))


def float_array(values: torch.Tensor, dtype: ir.DataType) -> np.ndarray:
    """``values`` (a float tensor) re-typed to the ONNX float ``dtype`` as a numpy array."""
    return to_numpy(values).astype(FLOAT_NUMPY[dtype])
