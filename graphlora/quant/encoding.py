"""An explicit, serialisable description of how one tensor is quantized.

An :class:`Encoding` binds a qtype to its parameters — scale, zero point, channel axis, block size
and the tensor shape — so the rest of graphlora never passes loose ``(scale, zp, axis, ...)``
tuples around. Encodings are produced by calibration (:mod:`weight_calibration`, :mod:`observers`,
:mod:`gptq`), applied by graph passes through the custom ops in :mod:`ops`, written to an
AIMET-1.0.0-like encodings file (:meth:`Encoding.to_dict`) and lowered to ONNX.

Parameter layouts are those of :mod:`graphlora.quant.affine`: 0-d (per-tensor), ``(C,)``
(per-channel along ``axis``) or ``(C, ceil(K / block_size))`` (per-block along the other axis of a
2-D weight; the last block may be shorter). The same canonical layout serves ``(out, in)``
(``nn.Linear``, ``axis=0``) and ``(in, out)`` (transformers ``Conv1D``, ``axis=1``) weights.

Storage of a quantized tensor (:meth:`Encoding.pack`): 8/16-bit codes are stored unpacked in the
qtype's code dtype and the tensor's own layout; 4-bit codes (``int4``/``uint4``/``nf4``) are stored
as the ``(C, ceil(K/2))`` uint8 packing of the canonical ``(C, K)`` matrix (first element in the
low nibble; per-tensor encodings use axis 0 for this layout); ``fp8_e4m3`` as a
``torch.float8_e4m3fn`` tensor in the tensor's own layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from graphlora.errors import QuantizationError
from graphlora.quant import affine
from graphlora.quant import ops as _ops
from graphlora.quant.memory import bits_per_param, storage_breakdown
from graphlora.quant.packing import pack_4bit, unpack_4bit
from graphlora.quant.qtypes import QType, get_qtype, with_grid

PER_TENSOR, PER_CHANNEL, PER_BLOCK = "PER_TENSOR", "PER_CHANNEL", "PER_BLOCK"

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _dtype_from_name(name: str) -> torch.dtype:
    for dtype, n in _DTYPE_NAMES.items():
        if n == name:
            return dtype
    raise QuantizationError(
        f"unknown scale dtype {name!r}; expected one of {list(_DTYPE_NAMES.values())}")


@dataclass(frozen=True, eq=False)
class DoubleQuant:
    """Double quantization of block scales (QLoRA §3): the first-level scales, minus their mean,
    are quantized to symmetric int8 in blocks of ``block_size`` (256 in the paper), each block with
    one float32 second-level scale. Costs ``8/g + 32/(256 g)`` bits per parameter instead of
    ``32/g`` for float32 scales of group size ``g``.
    """

    codes: torch.Tensor  # int8, shaped like the first-level scale
    scale: torch.Tensor  # float32, (ceil(codes.numel() / block_size),)
    mean: torch.Tensor  # float32, 0-d
    block_size: int = 256

    @classmethod
    def from_scales(cls, scales: torch.Tensor, block_size: int = 256) -> DoubleQuant:
        flat = scales.to(torch.float32).reshape(-1)
        mean = flat.mean()
        centred = flat - mean
        nblocks = math.ceil(flat.numel() / block_size)
        padded = torch.nn.functional.pad(centred, (0, nblocks * block_size - flat.numel()))
        absmax = padded.reshape(nblocks, block_size).abs().amax(dim=1)
        s2 = (absmax / 127).clamp_min(torch.finfo(torch.float32).tiny)
        s2_full = s2.repeat_interleave(block_size)[: flat.numel()]
        codes = torch.round(centred / s2_full).clamp(-127, 127)
        # Scales must stay positive after the round trip; a code one step up is within s2 of the
        # true (non-negative) value and positive.
        codes = torch.where(codes * s2_full + mean <= 0, codes + 1, codes)
        codes = codes.to(torch.int8).reshape(scales.shape)
        return cls(codes, s2, mean.reshape(()), block_size)

    def dequantize(self) -> torch.Tensor:
        return _ops.dequantize_double_quant(self.codes, self.scale, self.mean, self.block_size)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scale.numel() + 4

    def to_dict(self) -> dict[str, Any]:
        return {
            "codes": [int(v) for v in self.codes.reshape(-1).tolist()],
            "scale": [float(v) for v in self.scale.tolist()],
            "mean": float(self.mean),
            "block_size": self.block_size,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], shape: tuple[int, ...]) -> DoubleQuant:
        return cls(
            torch.tensor(d["codes"], dtype=torch.int8).reshape(shape),
            torch.tensor(d["scale"], dtype=torch.float32),
            torch.tensor(d["mean"], dtype=torch.float32),
            int(d["block_size"]),
        )


@dataclass(frozen=True, eq=False)
class Encoding:
    """How one tensor is quantized. Immutable; build new ones with :func:`dataclasses.replace`.

    ``scale`` is the float scale (for ``nf4``, the block absmax; with ``double_quant`` set, the
    *dequantized* absmax that quantization and dequantization actually use). ``zero_point`` is
    None for symmetric signed encodings and an int32 tensor shaped like ``scale`` otherwise.
    ``shape`` is the shape of the tensor the encoding was computed for; per-tensor encodings of
    activations apply to any shape and may carry ``()``.
    """

    qtype: QType
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    axis: int | None = None
    block_size: int | None = None
    shape: tuple[int, ...] = ()
    symmetric: bool = True
    double_quant: DoubleQuant | None = None
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "qtype", get_qtype(self.qtype))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.axis is not None and self.shape:
            object.__setattr__(self, "axis", self.axis % len(self.shape))
        self._validate()

    # ------------------------------------------------------------------------ validation
    def _where(self) -> str:
        return f"encoding of {self.name!r}" if self.name else "encoding"

    def _fail(self, msg: str) -> None:
        raise QuantizationError(f"{self._where()} ({self.qtype.name}): {msg}")

    def _validate(self) -> None:
        s, q = self.scale, self.qtype
        if not isinstance(s, torch.Tensor) or not s.dtype.is_floating_point:
            self._fail("scale must be a floating-point tensor")
        if s.numel() and not (torch.isfinite(s).all() and (s > 0).all()):
            self._fail("scale must be finite and > 0")
        if self.block_size is not None:
            if self.block_size <= 0:
                self._fail(f"block_size must be positive, got {self.block_size}")
            if len(self.shape) != 2 or self.axis is None:
                self._fail(
                    f"per-block encodings need a 2-D shape and an axis, got shape {self.shape}")
            c, k = self.shape[self.axis], self.shape[1 - self.axis]
            if tuple(s.shape) != (c, math.ceil(k / self.block_size)):
                self._fail(
                    f"per-block scale must have shape ({c}, {math.ceil(k / self.block_size)}) for "
                    f"shape {self.shape}, axis {self.axis}, block_size {self.block_size}; "
                    f"got {tuple(s.shape)}"
                )
        elif s.dim() == 1:
            if self.axis is None or not self.shape or self.shape[self.axis] != s.shape[0]:
                self._fail(f"per-channel scale of length {s.shape[0]} does not fit shape "
                           f"{self.shape} with axis {self.axis}")
        elif s.dim() != 0:
            self._fail(f"scale must be 0-d, (C,) or (C, n_blocks); got shape {tuple(s.shape)}")
        zp = self.zero_point
        if zp is not None:
            if q.kind != "int":
                self._fail("only integer qtypes take a zero point")
            if zp.dtype.is_floating_point or tuple(zp.shape) != tuple(s.shape):
                self._fail(
                    f"zero_point must be an integer tensor shaped like scale {tuple(s.shape)}")
            if zp.numel() and (int(zp.min()) < q.qmin or int(zp.max()) > q.qmax):
                self._fail(f"zero_point outside [{q.qmin}, {q.qmax}]")
        elif q.kind == "int" and not q.signed:
            self._fail("unsigned qtypes need a zero point (use 2**(bits-1) for symmetric)")
        if q.grid == "restricted":
            mid = (q.qmax + 1) // 2
            if not self.symmetric or (zp is not None and bool((zp != mid).any())):
                self._fail("the restricted grid is symmetric: it needs symmetric=True and a zero "
                           f"point of {0 if q.signed else mid}")
        dq = self.double_quant
        if dq is not None:
            if q.kind != "nf4":
                self._fail("double quantization is only implemented for nf4 scales")
            if tuple(dq.codes.shape) != tuple(s.shape) or dq.codes.dtype != torch.int8:
                self._fail("double-quantized scale codes must be int8 shaped like scale")
            if dq.scale.numel() != math.ceil(dq.codes.numel() / dq.block_size):
                self._fail("double quantization needs one second-level scale per block")

    # ------------------------------------------------------------------------- properties
    @property
    def granularity(self) -> str:
        if self.block_size is not None:
            return PER_BLOCK
        return PER_CHANNEL if self.scale.dim() == 1 else PER_TENSOR

    @property
    def grid(self) -> str:
        """``"full"`` or ``"restricted"`` (see :data:`graphlora.quant.qtypes.GRIDS`)."""
        return self.qtype.grid

    @property
    def layout_axis(self) -> int:
        """The channel axis used for the canonical (packed) layout (0 for per-tensor)."""
        return 0 if self.axis is None else self.axis

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def _param_axis(self) -> int | None:
        return None if self.scale.dim() == 0 else self.axis

    def _check_shape(self, x: torch.Tensor, what: str) -> None:
        if self.granularity != PER_TENSOR and tuple(x.shape) != self.shape:
            self._fail(f"{what} has shape {tuple(x.shape)}, the encoding was made for {self.shape}")

    # ----------------------------------------------------------------------- numerics
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of ``x`` (unpacked, in ``qtype.code_dtype``; float8 for fp8)."""
        self._check_shape(x, "tensor to quantize")
        if not torch.isfinite(x).all():
            self._fail("cannot quantize a tensor containing NaN or Inf")
        q = self.qtype
        if q.kind == "int":
            return _ops.quantize(x, self.scale, self.zero_point, self._param_axis(),
                                 self.block_size, q.qmin, q.qmax, q.code_dtype)
        if q.kind == "nf4":
            return affine.quantize_nf4(x, self.scale, self._param_axis(), self.block_size)
        return _ops.quantize_fp8(x, self.scale, self._param_axis())

    def dequantize(self, q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float values of unpacked codes ``q``."""
        self._check_shape(q, "codes to dequantize")
        kind = self.qtype.kind
        if kind == "int":
            return _ops.dequantize(q, self.scale, self.zero_point, self._param_axis(),
                                   self.block_size, dtype)
        if kind == "nf4":
            return affine.dequantize_nf4(q, self.scale, self._param_axis(), self.block_size, dtype)
        return _ops.dequantize_fp8(q, self.scale, self._param_axis(), dtype)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(x))`` in ``x``'s dtype, differentiable.

        Integer qtypes use the ``graphlora::fake_quantize`` op (clipped straight-through
        estimator); nf4/fp8 use a plain identity straight-through estimator, since their grids
        have no integer range to clip against.
        """
        q = self.qtype
        if q.kind == "int":
            return _ops.fake_quantize(x, self.scale, self.zero_point, self._param_axis(),
                                      self.block_size, q.qmin, q.qmax)
        y = self.dequantize(self.quantize(x.detach()), x.dtype)
        return x + (y - x).detach()

    # ------------------------------------------------------------------------ storage
    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Storage form of codes (see the module docstring for the layouts)."""
        if not self.qtype.packed:
            return codes
        canon = affine.to_canonical(codes, self.layout_axis)
        return pack_4bit(canon, signed=self.qtype.signed)

    def unpack(self, storage: torch.Tensor) -> torch.Tensor:
        """Codes, in the tensor's layout, from :meth:`pack`'s storage."""
        if not self.qtype.packed:
            return storage
        c = self.shape[self.layout_axis]
        codes = unpack_4bit(storage, self.numel // c, signed=self.qtype.signed)
        return affine.from_canonical(codes, self.shape, self.layout_axis)

    def quantize_to_storage(self, x: torch.Tensor) -> torch.Tensor:
        return self.pack(self.quantize(x))

    def storage_op(self, storage: torch.Tensor, dtype: torch.dtype = torch.float32):
        """``(op, args)`` such that ``op(*args)`` dequantizes ``storage`` to a float tensor of
        ``shape``; a graph pass emits exactly this call (one node), mapping each tensor in
        ``args`` to a buffer."""
        q, shape, axis = self.qtype, list(self.shape), self.layout_axis
        if q.kind == "int" and q.packed:
            return _ops.OPS["dequantize_packed4"], (
                storage, self.scale, self._zp_codes(), shape, axis, self.block_size, q.signed,
                dtype)
        if q.kind == "int":
            return _ops.OPS["dequantize"], (
                storage, self.scale, self.zero_point, self._param_axis(), self.block_size, dtype)
        if q.kind == "nf4" and self.double_quant is not None:
            dq = self.double_quant
            return _ops.OPS["dequantize_nf4_dq"], (
                storage, dq.codes, dq.scale, dq.mean, shape, axis, self.block_size,
                dq.block_size, dtype)
        if q.kind == "nf4":
            return _ops.OPS["dequantize_nf4"], (storage, self.scale, shape, axis, self.block_size,
                                                dtype)
        return _ops.OPS["dequantize_fp8"], (storage, self.scale, self._param_axis(), dtype)

    def dequantize_storage(self, storage: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
        op, args = self.storage_op(storage, dtype)
        return op(*args)

    def _zp_codes(self) -> torch.Tensor | None:
        """Zero point in the 4-bit code dtype (the packed op takes unpacked zero-point codes)."""
        if self.zero_point is None:
            return None
        return self.zero_point.to(self.qtype.code_dtype)

    # ------------------------------------------------------------------------- memory
    @property
    def nbytes(self) -> int:
        """Bytes of the stored quantized tensor plus its parameters (see :mod:`memory`)."""
        return storage_breakdown(self)["total_bytes"]

    @property
    def bits_per_param(self) -> float:
        return bits_per_param(self)

    # -------------------------------------------------------------------- serialisation
    def offsets(self) -> torch.Tensor:
        """AIMET offsets: AIMET dequantizes ``(q_u + offset) * scale`` with ``q_u`` on the unsigned
        grid ``[0, 2**bw - 1]``, so ``offset = qmin - zero_point`` (-128 for symmetric 8-bit)."""
        zp = self.zero_point if self.zero_point is not None else torch.zeros(self.scale.shape)
        return self.qtype.full.qmin - zp.to(torch.int64)

    def to_dict(self, name: str | None = None) -> dict[str, Any]:
        """A JSON-safe dict in the shape of an AIMET 1.0.0 encoding entry, plus a ``graphlora``
        key holding what AIMET's format cannot say (qtype, grid, axis, shape, scale dtype, double
        quantization) so :meth:`from_dict` round-trips exactly. ``dtype`` is ``"INT"`` or
        ``"FLOAT"`` (fp8) as in AIMET, and ``"NF4"`` — an extension AIMET does not define."""
        q = self.qtype
        scale = self.scale.to(torch.float32).reshape(-1)
        d: dict[str, Any] = {
            "name": name if name is not None else self.name,
            "dtype": {"int": "INT", "float8": "FLOAT", "nf4": "NF4"}[q.kind],
            "enc_type": self.granularity,
            "bw": q.bits,
            "is_sym": bool(self.symmetric),
            "scale": [float(v) for v in scale.tolist()],
        }
        if q.kind == "int":
            d["offset"] = [int(v) for v in self.offsets().reshape(-1).tolist()]
        if self.block_size is not None:
            d["block_size"] = int(self.block_size)
        d["graphlora"] = {
            "qtype": q.name,
            "grid": q.grid,
            "axis": self.axis,
            "shape": list(self.shape),
            "scale_dtype": _DTYPE_NAMES[self.scale.dtype],
            "double_quant": None if self.double_quant is None else self.double_quant.to_dict(),
        }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, shape: tuple[int, ...] | None = None,
                  axis: int | None = None) -> Encoding:
        """Inverse of :meth:`to_dict`. Plain AIMET entries (no ``graphlora`` key) are accepted for
        integer encodings; per-channel/per-block ones then need ``shape`` and ``axis``."""
        extra = d.get("graphlora") or {}
        try:
            enc_type, bw = d["enc_type"], int(d["bw"])
            is_sym = bool(d.get("is_sym", True))
            if "qtype" in extra:
                qtype = get_qtype(extra["qtype"])
                if extra.get("grid", "full") != "full":
                    qtype = with_grid(qtype, extra["grid"])
            elif d.get("dtype") == "INT":
                qtype = get_qtype(("int" if is_sym else "uint") + str(bw))
            else:
                raise QuantizationError(f"cannot infer a qtype from dtype {d.get('dtype')!r}")
            shape = tuple(extra.get("shape", shape if shape is not None else ()))
            axis = extra.get("axis", axis)
            block = d.get("block_size")
            scale_dtype = _dtype_from_name(extra.get("scale_dtype", "float32"))
            flat = torch.tensor(d["scale"], dtype=torch.float32)
        except KeyError as exc:
            raise QuantizationError(f"encoding entry {d.get('name')!r} lacks key {exc}") from None
        if enc_type == PER_TENSOR:
            pshape: tuple[int, ...] = ()
        elif enc_type == PER_CHANNEL:
            pshape = (flat.numel(),)
        elif enc_type == PER_BLOCK:
            if len(shape) != 2 or axis is None:
                raise QuantizationError(
                    f"PER_BLOCK entry {d.get('name')!r} needs the 2-D tensor shape and axis")
            pshape = (shape[axis], math.ceil(shape[1 - axis] / int(block)))
        else:
            raise QuantizationError(f"unknown enc_type {enc_type!r} in entry {d.get('name')!r}")
        scale = flat.reshape(pshape).to(scale_dtype)
        zp = None
        if qtype.kind == "int" and "offset" in d:
            zp_t = qtype.full.qmin - torch.tensor(d["offset"], dtype=torch.int64).reshape(pshape)
            if not (qtype.signed and is_sym and bool((zp_t == 0).all())):
                zp = zp_t.to(torch.int32)
        dq = extra.get("double_quant")
        return cls(qtype, scale, zp, axis, block, shape, is_sym,
                   None if dq is None else DoubleQuant.from_dict(dq, pshape), d.get("name"))
