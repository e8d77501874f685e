"""Choosing a weight :class:`Encoding` from the weight alone (round-to-nearest calibration).

Methods:

* ``absmax`` — symmetric, range ``[-max|w|, max|w|]`` per tensor/channel/group;
* ``minmax`` — asymmetric, range ``[min w, max w]`` (widened to contain 0) with a zero point;
* ``mse`` — shrink the absmax/minmax range by each of ``mse_candidates`` ratios from 1.0 down to
  ``mse_min_ratio`` and keep, per channel or group, the one whose quantize-dequantize error
  (sum of squares) is lowest. Vectorised over channels and groups; loops over the candidates only.

GPTQ (which also needs calibration inputs) lives in :mod:`graphlora.quant.gptq`.

Every weight is viewed as a 3-D grouped tensor ``(C, G, g)``: ``(1, 1, numel)`` per-tensor,
``(C, 1, K)`` per-channel, ``(C, ceil(K/g), g)`` per-group, the last group zero-padded. Zero padding
never changes a range (ranges always contain 0) and quantizes exactly to 0 (every grid here has 0),
so padded elements add nothing to a group's error either.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from graphlora.errors import QuantizationError
from graphlora.quant import affine
from graphlora.quant.encoding import DoubleQuant, Encoding
from graphlora.quant.qtypes import QType, check_qtype_use, get_qtype, resolve_grid

Method = Literal["absmax", "minmax", "mse"]


def check_finite(w: torch.Tensor, name: str | None, what: str = "weight") -> None:
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise QuantizationError(
            f"{what} {name or '<unnamed>'!s} contains {bad} NaN/Inf value(s) and cannot be "
            f"quantized; fix the {what} (or exclude it with a rule) first"
        )


def grouped(w: torch.Tensor, axis: int | None, block_size: int | None) -> torch.Tensor:
    """The ``(C, G, g)`` float32 grouped view described in the module docstring."""
    w = w.to(torch.float32)
    if axis is None:
        if block_size is not None:
            raise QuantizationError("per-group quantization needs a channel axis")
        return w.reshape(1, 1, -1)
    canon = affine.to_canonical(w, axis)
    if block_size is None:
        return canon.unsqueeze(1)
    if w.dim() != 2:
        raise QuantizationError(
            f"per-group quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    c, k = canon.shape
    g = math.ceil(k / block_size)
    canon = torch.nn.functional.pad(canon, (0, g * block_size - k))
    return canon.reshape(c, g, block_size)


def params_shape(w_shape: tuple[int, ...], axis: int | None, block_size: int | None) -> tuple:
    if axis is None:
        return ()
    c = w_shape[axis]
    if block_size is None:
        return (c,)
    return (c, math.ceil(w_shape[1 - axis] / block_size))


# ----------------------------------------------------------------- range -> params, per kind
def params_from_range(
    lo: torch.Tensor, hi: torch.Tensor, qtype: QType, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) for ranges ``[lo, hi]`` of any qtype kind."""
    if qtype.kind == "int":
        return affine.affine_params_from_range(
            lo, hi, qmin=qtype.qmin, qmax=qtype.qmax, signed=qtype.signed, symmetric=symmetric,
            scale_dtype=scale_dtype)
    absmax = torch.maximum(lo.abs(), hi.abs())
    if qtype.kind == "nf4":
        return affine.round_scale_up(absmax, scale_dtype), None
    return affine.round_scale_up(absmax / affine.FP8_E4M3_MAX, scale_dtype), None


def qdq(
    x: torch.Tensor, qtype: QType, scale: torch.Tensor, zp: torch.Tensor | None
) -> torch.Tensor:
    """Quantize-dequantize with parameters already broadcastable against ``x``."""
    s = scale.to(torch.float32)
    if qtype.kind == "int":
        q = torch.round(x / s)
        if zp is None:
            return q.clamp_(qtype.qmin, qtype.qmax) * s
        z = zp.to(torch.float32)
        return (q + z).clamp_(qtype.qmin, qtype.qmax).sub_(z) * s
    if qtype.kind == "nf4":
        norm = torch.where(s != 0, x / s, torch.zeros((), dtype=torch.float32))
        return affine.nf4_values(affine.nf4_codes(norm)) * s
    return (x / s).clamp(-affine.FP8_E4M3_MAX, affine.FP8_E4M3_MAX).to(
        torch.float8_e4m3fn).to(torch.float32) * s


def group_ranges(xg: torch.Tensor, symmetric: bool,
                 qtype: QType | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(lo, hi)`` of a ``(C, G, g)`` tensor, shaped ``(C, G)``.

    Symmetric ranges are mirrored (``[-max|x|, max|x|]``) except on a full integer grid, whose
    extra negative code makes the two sides differ: there the range is the group's own
    ``[min, max]`` (with 0), which gives AIMET's ``max(|min| / 8, max / 7)`` for int4.
    """
    if symmetric and (qtype is None or qtype.kind != "int" or qtype.grid != "full"):
        a = xg.abs().amax(dim=-1)
        return -a, a
    if symmetric:
        return xg.amin(dim=-1).clamp_max(0.0), xg.amax(dim=-1).clamp_min(0.0)
    return xg.amin(dim=-1), xg.amax(dim=-1)


def search_mse(
    xg: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    qtype: QType,
    symmetric: bool,
    scale_dtype: torch.dtype,
    candidates: int = 100,
    min_ratio: float = 0.5,
    chunk_elements: int = 1 << 18,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group parameters minimising the quantize-dequantize squared error over shrunk ranges.

    All candidates of a chunk of groups are scored in one batched pass (``(candidates, groups,
    g)`` tensors of about ``chunk_elements`` elements): few, large kernels keep this fast even
    when other processes compete for the cores. Ties go to the widest range.
    """
    c, g_count, g = xg.shape
    x_all = xg.reshape(-1, g)
    lo_all, hi_all = lo.reshape(-1), hi.reshape(-1)
    ratios = torch.linspace(1.0, min_ratio, candidates, device=xg.device).unsqueeze(1)
    rows = max(1, chunk_elements // (candidates * g))
    scales, zps = [], []
    for r0 in range(0, x_all.shape[0], rows):
        x = x_all[r0:r0 + rows]
        scale, zp = params_from_range(lo_all[r0:r0 + rows] * ratios, hi_all[r0:r0 + rows] * ratios,
                                      qtype, symmetric, scale_dtype)  # (candidates, rows)
        zp_b = None if zp is None else zp.unsqueeze(-1)
        err = qdq(x.unsqueeze(0), qtype, scale.unsqueeze(-1), zp_b).sub_(x).pow_(2).sum(dim=-1)
        best = torch.argmin(err, dim=0, keepdim=True)  # first minimum = widest range
        scales.append(scale.gather(0, best)[0])
        zps.append(None if zp is None else zp.gather(0, best)[0])
    scale = torch.cat(scales).reshape(c, g_count)
    return scale, None if zps[0] is None else torch.cat(zps).reshape(c, g_count)


def group_params(
    xg: torch.Tensor,
    qtype: QType,
    method: Method,
    symmetric: bool,
    scale_dtype: torch.dtype,
    mse_candidates: int = 100,
    mse_min_ratio: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Parameters ``(C, G)`` for a grouped tensor (shared by RTN calibration and GPTQ), on the
    grid ``qtype`` carries (see :func:`graphlora.quant.qtypes.resolve_grid`)."""
    lo, hi = group_ranges(xg, symmetric, qtype)
    if method == "mse":
        return search_mse(xg, lo, hi, qtype, symmetric, scale_dtype, mse_candidates,
                          mse_min_ratio)
    return params_from_range(lo, hi, qtype, symmetric, scale_dtype)


def resolve_symmetric(qtype: QType, method: str, symmetric: bool | None) -> bool:
    if qtype.kind != "int":
        if symmetric is False:
            raise QuantizationError(f"qtype {qtype.name!r} is symmetric only")
        return True
    if method == "absmax":
        if symmetric is False:
            raise QuantizationError("method 'absmax' is symmetric; use 'minmax' for asymmetric")
        return True
    if method == "minmax":
        return False if symmetric is None else symmetric
    return qtype.signed if symmetric is None else symmetric


def calibrate_weight(
    w: torch.Tensor,
    qtype: str | QType = "int8",
    *,
    method: Method = "absmax",
    axis: int | None = 0,
    block_size: int | None = None,
    symmetric: bool | None = None,
    scale_dtype: torch.dtype = torch.float32,
    double_quant: bool = False,
    mse_candidates: int = 100,
    mse_min_ratio: float = 0.5,
    name: str | None = None,
    grid: str | None = None,
) -> Encoding:
    """Compute a weight encoding by round-to-nearest calibration.

    ``axis`` is the output-channel axis (0 for ``nn.Linear``'s ``(out, in)``, 1 for transformers
    ``Conv1D``'s ``(in, out)``), None for per-tensor. ``block_size`` groups the other (input) axis
    of a 2-D weight. ``symmetric`` defaults to True for ``absmax``, False for ``minmax`` and to the
    qtype's signedness for ``mse``. ``double_quant`` (nf4 only) double-quantizes the absmax values
    (QLoRA); the returned encoding's ``scale`` is then the dequantized absmax. ``grid`` picks
    the symmetric integer grid (``"full"``: all codes, AIMET's; ``"restricted"``: without the
    most negative one); None keeps the grid of a QType object, or the default grid of a qtype
    name (:data:`graphlora.quant.qtypes.DEFAULT_GRIDS`).
    """
    check_qtype_use(qtype, "weight")
    if method not in ("absmax", "minmax", "mse"):
        raise QuantizationError(
            f"unknown weight calibration method {method!r}; expected absmax, minmax or mse "
            "(GPTQ: graphlora.quant.gptq.gptq_quantize)")
    check_finite(w, name)
    sym = resolve_symmetric(get_qtype(qtype), method, symmetric)
    qt = resolve_grid(qtype, grid, sym)
    if axis is not None:
        axis = axis % w.dim()
    xg = grouped(w, axis, block_size)
    scale, zp = group_params(xg, qt, method, sym, scale_dtype, mse_candidates, mse_min_ratio)
    return build_encoding(qt, scale, zp, w.shape, axis, block_size, sym, double_quant, name)


def build_encoding(
    qtype: QType,
    scale: torch.Tensor,
    zp: torch.Tensor | None,
    shape: tuple[int, ...] | torch.Size,
    axis: int | None,
    block_size: int | None,
    symmetric: bool,
    double_quant: bool = False,
    name: str | None = None,
) -> Encoding:
    """An Encoding from ``(C, G)`` group parameters (reshaped to the parameter layout)."""
    pshape = params_shape(tuple(shape), axis, block_size)
    scale = scale.reshape(pshape)
    zp = None if zp is None else zp.reshape(pshape).to(torch.int32)
    dq = None
    if double_quant:
        if qtype.kind != "nf4":
            raise QuantizationError(f"double quantization is implemented for nf4, not {qtype.name}")
        dq = DoubleQuant.from_scales(scale)
        scale = dq.dequantize()
    return Encoding(qtype, scale, zp, axis, block_size, tuple(shape), symmetric, dq, name)
