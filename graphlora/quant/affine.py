"""The numerics, as plain tensor functions: the custom op kernels in :mod:`ops` call these, and
calibration uses them to score candidate ranges. Nothing here knows about graphs or LoRA.

Conventions shared by every function:

* Affine: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and
  ``x̂ = (q - zero_point) * scale``; ``round`` is round-half-to-even, as ONNX ``QuantizeLinear``.
* Parameter layout (``scale``/``zero_point``), for a tensor of shape ``shape`` with channel axis
  ``axis``:

  - per-tensor: a 0-d tensor;
  - per-channel: shape ``(C,)`` with ``C = shape[axis]``;
  - per-block (2-D tensors only): shape ``(C, ceil(K / block_size))``, channel-major, where ``K``
    is the length of the other (input) axis; the last block of a row may be shorter. This
    "canonical" layout is the same for ``(out, in)`` (``axis=0``) and ``(in, out)`` (``axis=1``)
    weights, and is the row-major order AIMET and ``MatMulNBits`` expect.

* Compute happens in float32 whatever the input dtype; scales may be stored in float16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graphlora.quant.qtypes import NF4_CODEBOOK

_NF4 = torch.tensor(NF4_CODEBOOK, dtype=torch.float32)
# Decision thresholds halfway between neighbouring codebook entries: a normalised value goes to the
# nearest entry (ties go to the lower entry).
_NF4_MID = (_NF4[1:] + _NF4[:-1]) / 2

FP8_E4M3_MAX = 448.0


def _f32(t: torch.Tensor) -> torch.Tensor:
    """float32 view of ``t`` without calling ``.float()`` on a float32 tensor (that returns the
    input itself, which torch's schema checks reject inside custom-op autograd hooks)."""
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def expand_param(
    p: torch.Tensor, shape: Sequence[int], axis: int | None, block_size: int | None
) -> torch.Tensor:
    """Broadcast a per-tensor/per-channel/per-block parameter against a tensor of ``shape``."""
    if p.dim() == 0:
        return p
    ndim = len(shape)
    if axis is None:
        raise ValueError("a non-scalar quantization parameter needs a channel axis")
    axis = axis % ndim
    if p.dim() == 1:
        view = [1] * ndim
        view[axis] = p.shape[0]
        return p.reshape(view)
    if ndim != 2 or block_size is None:
        raise ValueError("per-block parameters need a 2-D tensor and a block_size")
    k = shape[1 - axis]
    full = p.repeat_interleave(block_size, dim=1)[:, :k]  # (C, K)
    return full if axis == 0 else full.t()


def to_canonical(x: torch.Tensor, axis: int) -> torch.Tensor:
    """The ``(C, K)`` canonical matrix of a weight: channel axis first, the rest flattened."""
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def from_canonical(w: torch.Tensor, shape: Sequence[int], axis: int) -> torch.Tensor:
    """Inverse of :func:`to_canonical` (returns a contiguous tensor of ``shape``)."""
    axis = axis % len(shape)
    moved = [shape[axis]] + [d for i, d in enumerate(shape) if i != axis]
    return w.reshape(moved).movedim(0, axis).contiguous()


def quantize_affine(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    axis: int | None,
    block_size: int | None,
    qmin: int,
    qmax: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    s = expand_param(_f32(scale), x.shape, axis, block_size)
    q = torch.round(_f32(x) / s)
    if zero_point is not None:
        q = q + expand_param(_f32(zero_point), x.shape, axis, block_size)
    return q.clamp_(qmin, qmax).to(dtype)


def dequantize_affine(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    axis: int | None,
    block_size: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    v = _f32(q)
    if zero_point is not None:
        v = v - expand_param(_f32(zero_point), q.shape, axis, block_size)
    return (v * expand_param(_f32(scale), q.shape, axis, block_size)).to(dtype)


def fake_quantize_affine(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    axis: int | None,
    block_size: int | None,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    s = expand_param(_f32(scale), x.shape, axis, block_size)
    q = torch.round(_f32(x) / s)
    if zero_point is None:
        return (q.clamp_(qmin, qmax) * s).to(x.dtype)
    z = expand_param(_f32(zero_point), x.shape, axis, block_size)
    return ((q + z).clamp_(qmin, qmax).sub_(z) * s).to(x.dtype)


def ste_mask(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    axis: int | None,
    block_size: int | None,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """Where the straight-through estimator passes the gradient: the rounded, *unclamped* code lies
    in ``[qmin, qmax]`` (the clipped STE of PyTorch's ``fake_quantize_per_tensor_affine``)."""
    q = torch.round(_f32(x) / expand_param(_f32(scale), x.shape, axis, block_size))
    if zero_point is not None:
        q = q + expand_param(_f32(zero_point), x.shape, axis, block_size)
    return (q >= qmin) & (q <= qmax)


# ----------------------------------------------------------------------------------------- nf4
def nf4_codes(normalised: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 codebook index (uint8) of values already divided by their block absmax."""
    mid = _NF4_MID.to(normalised.device)
    return torch.bucketize(_f32(normalised).clamp(-1.0, 1.0).contiguous(), mid).to(torch.uint8)


def nf4_values(codes: torch.Tensor) -> torch.Tensor:
    """Codebook lookup: codes (any integer dtype, 0..15) -> float32 normalised values."""
    return _NF4.to(codes.device)[codes.long()]


def quantize_nf4(
    x: torch.Tensor, absmax: torch.Tensor, axis: int | None, block_size: int | None
) -> torch.Tensor:
    a = expand_param(_f32(absmax), x.shape, axis, block_size)
    # a zero absmax (an all-zero block) must give code 7 (0.0), not NaN
    return nf4_codes(torch.where(a != 0, _f32(x) / a, torch.zeros((), dtype=torch.float32)))


def dequantize_nf4(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    axis: int | None,
    block_size: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    a = expand_param(_f32(absmax), codes.shape, axis, block_size)
    return (nf4_values(codes) * a).to(dtype)


# ----------------------------------------------------------------------------------------- fp8
def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Scale into the e4m3 range and round to the nearest e4m3 value (saturating: e4m3fn has no
    infinity, so out-of-range values would otherwise become NaN)."""
    s = expand_param(_f32(scale), x.shape, axis, None)
    return (_f32(x) / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, axis: int | None, dtype: torch.dtype
) -> torch.Tensor:
    return (_f32(q) * expand_param(_f32(scale), q.shape, axis, None)).to(dtype)


# ------------------------------------------------------------------------ ranges -> parameters
def round_scale_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Store a positive float32 scale in ``dtype`` without ever making it smaller, so a range that
    fit the float32 scale still fits (an error bound of scale/2 then holds for the stored scale)."""
    scale = _f32(scale).clamp_min(torch.finfo(dtype).tiny)
    if dtype == torch.float32:
        return scale
    stored = scale.to(dtype)
    too_small = _f32(stored) < scale
    bumped = torch.nextafter(stored, torch.full_like(stored, float("inf")))
    return torch.where(too_small, bumped, stored)


def affine_params_from_range(
    lo: torch.Tensor,
    hi: torch.Tensor,
    *,
    qmin: int,
    qmax: int,
    signed: bool,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point covering ``[lo, hi]`` (elementwise over parameter tensors).

    Symmetric, around the zero point ``z`` (0 for signed grids, the midpoint ``2**(bits-1)`` for
    unsigned ones, returned as a tensor since it is not 0): ``scale = max(-lo / (z - qmin),
    hi / (qmax - z))``, the smallest scale putting ``lo`` and ``hi`` on the grid. On the full int4
    grid (-8..7) that is AIMET's ``max(|min| / 8, max / 7)``; on the restricted one (-7..7), or
    for a range already mirrored (``lo = -hi``), it is ``max(|lo|, |hi|) / 7``.
    Asymmetric: the range is widened to contain 0 (so 0 is exact, which padding and ReLU need),
    ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = clamp(round(qmin - lo / scale))``.
    """
    lo = _f32(lo)
    hi = _f32(hi)
    if symmetric:
        # the unsigned midpoint of the full grid: (qmax + 1) // 2 whether qmin is 0 or 1
        mid = 0 if signed else (qmax + 1) // 2
        neg = (-lo).clamp_min(0.0) / (mid - qmin)
        pos = hi.clamp_min(0.0) / (qmax - mid)
        scale = round_scale_up(torch.maximum(neg, pos), scale_dtype)
        if signed:
            return scale, None
        return scale, torch.full_like(scale, mid, dtype=torch.int32)
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = round_scale_up((hi - lo) / (qmax - qmin), scale_dtype)
    zp = torch.round(qmin - lo / _f32(scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zp
