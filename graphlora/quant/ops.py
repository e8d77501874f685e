"""Quantize/dequantize as ``torch.library`` custom ops in the ``graphlora`` namespace.

Each op has a real CPU/any-device kernel, a fake (meta) kernel so it traces under ``torch.export``
and ``torch.compile`` as ONE node, and — where it is differentiable — an autograd formula. Graph
passes insert calls to these ops; the ONNX lowering translates exactly these ops and nothing else.
Importing this module registers them.

Schemas (the contract the graph passes and the ONNX lowering rely on)::

    graphlora::quantize(Tensor x, Tensor scale, Tensor? zero_point, int? axis, int? block_size,
                        int qmin, int qmax, ScalarType dtype) -> Tensor
    graphlora::dequantize(Tensor q, Tensor scale, Tensor? zero_point, int? axis, int? block_size,
                          ScalarType dtype) -> Tensor
    graphlora::fake_quantize(Tensor x, Tensor scale, Tensor? zero_point, int? axis,
                             int? block_size, int qmin, int qmax) -> Tensor
    graphlora::dequantize_packed4(Tensor packed, Tensor scale, Tensor? zero_point, int[] shape,
                                  int axis, int? block_size, bool signed, ScalarType dtype)
                                  -> Tensor
    graphlora::dequantize_nf4(Tensor packed, Tensor absmax, int[] shape, int axis,
                              int? block_size, ScalarType dtype) -> Tensor
    graphlora::dequantize_nf4_dq(Tensor packed, Tensor absmax_q, Tensor absmax_scale,
                                 Tensor absmax_mean, int[] shape, int axis, int? block_size,
                                 int absmax_block_size, ScalarType dtype) -> Tensor
    graphlora::quantize_fp8(Tensor x, Tensor scale, int? axis) -> Tensor
    graphlora::dequantize_fp8(Tensor q, Tensor scale, int? axis, ScalarType dtype) -> Tensor

Semantics (see :mod:`graphlora.quant.affine` for the parameter layouts):

* ``quantize``/``dequantize``/``fake_quantize`` — affine, on a tensor in its own layout:
  ``q = clamp(round_half_even(x / s) + zp, qmin, qmax)``, ``x̂ = (q - zp) * s``. ``scale`` is 0-d
  (per-tensor, ``axis`` ignored), ``(C,)`` (per-channel along ``axis``) or ``(C, n_blocks)``
  (per-block, 2-D ``x`` only, blocks of ``block_size`` along the axis other than ``axis``).
  ``zero_point`` (same shape as ``scale``, any integer dtype, or None = 0) holds code-domain values.
  ``quantize`` returns codes in ``dtype`` (int8/uint8/int16/int32); ``fake_quantize`` returns
  ``x``'s dtype.
* ``fake_quantize`` backward — the *clipped* straight-through estimator: ``dL/dx = dL/dy`` where the
  rounded, unclamped code ``round(x / s) + zp`` lies in ``[qmin, qmax]``, and 0 where it was
  clamped. Scale and zero point get no gradient (they are calibrated, not learned).
* ``dequantize_packed4`` — 4-bit weights in *canonical* layout: the weight of shape ``shape``
  with its output-channel axis ``axis`` moved first and the rest flattened is a ``(C, K)`` matrix;
  ``packed`` is its ``(C, ceil(K/2))`` uint8 packing (first element in the low nibble, two's
  complement when ``signed``). ``scale``/``zero_point`` are 0-d, ``(C,)`` or ``(C, ceil(K/bs))``
  (per-block needs a 2-D ``shape``); ``zero_point`` holds unpacked codes (uint8 for uint4, int8 for
  int4) or is None. Returns the weight in its original layout and ``shape``.
* ``dequantize_nf4`` — same packed layout with NF4 codebook indices: ``x̂ = NF4[code] * absmax``,
  ``absmax`` laid out like ``scale`` above.
* ``dequantize_nf4_dq`` — as ``dequantize_nf4`` but the absmax values are double-quantized:
  ``absmax = absmax_q * absmax_scale[i // absmax_block_size] + absmax_mean`` over the flattened
  (row-major) ``absmax_q`` (int8, laid out like ``absmax``), ``absmax_scale`` float32 of length
  ``ceil(numel / absmax_block_size)``, ``absmax_mean`` a float32 0-d tensor.
* ``quantize_fp8``/``dequantize_fp8`` — ``q = e4m3fn(clamp(x / s, ±448))``, ``x̂ = float(q) * s``;
  ``scale`` 0-d or ``(C,)`` along ``axis``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from graphlora.errors import QuantizationError
from graphlora.quant import affine, lookup
from graphlora.quant.packing import packed_length

NAMESPACE = "graphlora"


def _op(name: str, schema: str):
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=(), schema=schema)


# ------------------------------------------------------------------------------ affine ops
@_op(
    "quantize",
    "(Tensor x, Tensor scale, Tensor? zero_point, int? axis, int? block_size, int qmin, "
    "int qmax, ScalarType dtype) -> Tensor",
)
def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    axis: int | None,
    block_size: int | None,
    qmin: int,
    qmax: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return affine.quantize_affine(x, scale, zero_point, axis, block_size, qmin, qmax, dtype)


@quantize.register_fake
def _(x, scale, zero_point, axis, block_size, qmin, qmax, dtype):
    return x.new_empty(x.shape, dtype=dtype)


@_op(
    "dequantize",
    "(Tensor q, Tensor scale, Tensor? zero_point, int? axis, int? block_size, ScalarType dtype) "
    "-> Tensor",
)
def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    axis: int | None,
    block_size: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    return affine.dequantize_affine(q, scale, zero_point, axis, block_size, dtype)


@dequantize.register_fake
def _(q, scale, zero_point, axis, block_size, dtype):
    return q.new_empty(q.shape, dtype=dtype)


@_op(
    "fake_quantize",
    "(Tensor x, Tensor scale, Tensor? zero_point, int? axis, int? block_size, int qmin, "
    "int qmax) -> Tensor",
)
def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    axis: int | None,
    block_size: int | None,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    return affine.fake_quantize_affine(x, scale, zero_point, axis, block_size, qmin, qmax)


@fake_quantize.register_fake
def _(x, scale, zero_point, axis, block_size, qmin, qmax):
    return torch.empty_like(x)


def _fq_setup_context(ctx, inputs, output):
    x, scale, zero_point, axis, block_size, qmin, qmax = inputs
    ctx.save_for_backward(affine.ste_mask(x, scale, zero_point, axis, block_size, qmin, qmax))


def _fq_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    return torch.where(mask, grad, torch.zeros_like(grad)), None, None, None, None, None, None


fake_quantize.register_autograd(_fq_backward, setup_context=_fq_setup_context)


# ------------------------------------------------------------------- packed 4-bit weights
def _canonical_dims(shape: Sequence[int], axis: int) -> tuple[int, int, int]:
    if not shape:
        raise QuantizationError("packed weights need a tensor of rank >= 1")
    axis = axis % len(shape)
    c = shape[axis]
    k = math.prod(shape) // c if c else 0
    return axis, c, k


def _check_packed(packed: torch.Tensor, shape: Sequence[int], axis: int, op: str) -> tuple:
    axis, c, k = _canonical_dims(shape, axis)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (c, packed_length(k)):
        raise QuantizationError(
            f"graphlora::{op}: packed must be uint8 of shape ({c}, {packed_length(k)}) for a "
            f"weight of shape {tuple(shape)} with channel axis {axis}; got {packed.dtype} "
            f"{tuple(packed.shape)}"
        )
    return axis, c, k


@_op(
    "dequantize_packed4",
    "(Tensor packed, Tensor scale, Tensor? zero_point, int[] shape, int axis, int? block_size, "
    "bool signed, ScalarType dtype) -> Tensor",
)
def dequantize_packed4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    shape: Sequence[int],
    axis: int,
    block_size: int | None,
    signed: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    axis, c, k = _check_packed(packed, shape, axis, "dequantize_packed4")
    w = lookup.dequantize_int4_packed(packed, scale, zero_point, k, block_size, signed, dtype)
    return affine.from_canonical(w, shape, axis)


@dequantize_packed4.register_fake
def _(packed, scale, zero_point, shape, axis, block_size, signed, dtype):
    _check_packed(packed, shape, axis, "dequantize_packed4")
    return packed.new_empty(tuple(shape), dtype=dtype)


@_op(
    "dequantize_nf4",
    "(Tensor packed, Tensor absmax, int[] shape, int axis, int? block_size, ScalarType dtype) "
    "-> Tensor",
)
def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    axis: int,
    block_size: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    axis, c, k = _check_packed(packed, shape, axis, "dequantize_nf4")
    w = lookup.dequantize_nf4_packed(packed, absmax, k, block_size, dtype)
    return affine.from_canonical(w, shape, axis)


@dequantize_nf4.register_fake
def _(packed, absmax, shape, axis, block_size, dtype):
    _check_packed(packed, shape, axis, "dequantize_nf4")
    return packed.new_empty(tuple(shape), dtype=dtype)


def dequantize_double_quant(
    absmax_q: torch.Tensor, absmax_scale: torch.Tensor, absmax_mean: torch.Tensor, block: int
) -> torch.Tensor:
    """Second-level dequantization of double-quantized scales (float32, shaped like absmax_q)."""
    flat = absmax_q.reshape(-1).to(torch.float32)
    s = absmax_scale.to(torch.float32).repeat_interleave(block)[: flat.numel()]
    return (flat * s + absmax_mean.to(torch.float32)).reshape(absmax_q.shape)


@_op(
    "dequantize_nf4_dq",
    "(Tensor packed, Tensor absmax_q, Tensor absmax_scale, Tensor absmax_mean, int[] shape, "
    "int axis, int? block_size, int absmax_block_size, ScalarType dtype) -> Tensor",
)
def dequantize_nf4_dq(
    packed: torch.Tensor,
    absmax_q: torch.Tensor,
    absmax_scale: torch.Tensor,
    absmax_mean: torch.Tensor,
    shape: Sequence[int],
    axis: int,
    block_size: int | None,
    absmax_block_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    axis, c, k = _check_packed(packed, shape, axis, "dequantize_nf4_dq")
    absmax = dequantize_double_quant(absmax_q, absmax_scale, absmax_mean, absmax_block_size)
    w = lookup.dequantize_nf4_packed(packed, absmax, k, block_size, dtype)
    return affine.from_canonical(w, shape, axis)


@dequantize_nf4_dq.register_fake
def _(packed, absmax_q, absmax_scale, absmax_mean, shape, axis, block_size, absmax_block_size,
      dtype):
    _check_packed(packed, shape, axis, "dequantize_nf4_dq")
    return packed.new_empty(tuple(shape), dtype=dtype)


# ------------------------------------------------------------------------------------ fp8
@_op("quantize_fp8", "(Tensor x, Tensor scale, int? axis) -> Tensor")
def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, axis: int | None) -> torch.Tensor:
    return affine.quantize_fp8(x, scale, axis)


@quantize_fp8.register_fake
def _(x, scale, axis):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn)


@_op("dequantize_fp8", "(Tensor q, Tensor scale, int? axis, ScalarType dtype) -> Tensor")
def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, axis: int | None, dtype: torch.dtype
) -> torch.Tensor:
    return affine.dequantize_fp8(q, scale, axis, dtype)


@dequantize_fp8.register_fake
def _(q, scale, axis, dtype):
    return q.new_empty(q.shape, dtype=dtype)


OPS = {
    "quantize": torch.ops.graphlora.quantize.default,
    "dequantize": torch.ops.graphlora.dequantize.default,
    "fake_quantize": torch.ops.graphlora.fake_quantize.default,
    "dequantize_packed4": torch.ops.graphlora.dequantize_packed4.default,
    "dequantize_nf4": torch.ops.graphlora.dequantize_nf4.default,
    "dequantize_nf4_dq": torch.ops.graphlora.dequantize_nf4_dq.default,
    "quantize_fp8": torch.ops.graphlora.quantize_fp8.default,
    "dequantize_fp8": torch.ops.graphlora.dequantize_fp8.default,
}
"""Every op overload this module registers, by name (the ONNX lowering dispatches on these)."""
