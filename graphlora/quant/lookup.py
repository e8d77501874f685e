"""Fast dequantization of packed 4-bit weights: one table lookup per byte, then one scale pass.

The reference path (:func:`graphlora.quant.packing._unpack` then :mod:`graphlora.quant.affine`)
widens the bytes to int16, splits the nibbles, stacks and flattens them, gathers the codebook
through int64 indices and expands the per-block scales with ``repeat_interleave``: six passes
over the weight, ~4-8x the time of this one on CPU. Here a 256-entry table maps each *byte*
straight to the float32 values of its two codes (one gather of 8-byte entries writes both
nibbles), and the scales multiply in place through a broadcast view when the blocks tile the
rows. Every value is the product of the same two float32 numbers as on the
reference path, so the results are bit-identical to it (tests/test_quant_lookup.py).
"""

from __future__ import annotations

import functools

import torch

from graphlora.quant.affine import _f32, expand_param
from graphlora.quant.qtypes import NF4_CODEBOOK


@functools.lru_cache(maxsize=None)
def _table(kind: str) -> torch.Tensor:
    """``(256,)`` int64 holding the float32 pair (value of the low nibble, value of the high
    nibble) of byte ``b``."""
    if kind == "nf4":
        values = torch.tensor(NF4_CODEBOOK, dtype=torch.float32)
    elif kind == "int4":  # two's-complement nibbles
        values = torch.tensor([float(i - 16 if i >= 8 else i) for i in range(16)])
    else:  # "uint4"
        values = torch.arange(16, dtype=torch.float32)
    low = values.repeat(16)  # byte b = low + 16 * high: low varies fastest
    high = values.repeat_interleave(16)
    # each row's two float32s as one int64, so the lookup gathers scalars (index_select on a 1-D
    # table vectorises; a gather of 2-float rows, as ``embedding``, is ~4x slower)
    return torch.stack([low, high], dim=-1).contiguous().view(torch.int64).view(256)


def lookup_values(packed: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    """``(C, ceil(k/2))`` packed bytes -> ``(C, k)`` float32 code values (codebook entries for
    ``nf4``, the integer codes themselves for ``int4``/``uint4``)."""
    table = _table(kind).to(packed.device)
    c = packed.shape[0]
    if packed.numel() == 0:
        return torch.zeros((c, k), dtype=torch.float32, device=packed.device)
    pairs = table.index_select(0, packed.reshape(-1).to(torch.int32))
    values = pairs.view(torch.float32).view(c, -1)
    return values if values.shape[1] == k else values[:, :k]


def _scaled(values: torch.Tensor, param: torch.Tensor, block_size: int | None,
            zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """``(values - zero_point) * param`` with ``param`` (and ``zero_point``) in the canonical
    per-tensor / per-channel / per-block layout of :mod:`graphlora.quant.affine`, computed in
    place on ``values`` (a fresh tensor) when the layout allows a broadcast view."""
    c, k = values.shape
    p = _f32(param)
    z = None if zero_point is None else _f32(zero_point)
    if p.dim() == 2 and block_size is not None and values.is_contiguous() and k % block_size == 0 \
            and p.shape[1] == k // block_size:
        blocks = values.view(c, k // block_size, block_size)
        if z is not None:
            blocks.sub_(z.unsqueeze(-1))
        return blocks.mul_(p.unsqueeze(-1)).view(c, k)
    if p.dim() <= 1:
        col = p if p.dim() == 0 else p.unsqueeze(-1)
        if z is not None:
            values = values - (z if z.dim() == 0 else z.unsqueeze(-1))
        return values * col
    if z is not None:
        values = values - expand_param(z, (c, k), 0, block_size)
    return values * expand_param(p, (c, k), 0, block_size)


def dequantize_nf4_packed(packed: torch.Tensor, absmax: torch.Tensor, k: int, block_size: int | None,
                          dtype: torch.dtype) -> torch.Tensor:
    """The canonical ``(C, k)`` weight of NF4-packed bytes: ``NF4[code] * absmax``."""
    return _scaled(lookup_values(packed, k, "nf4"), absmax, block_size).to(dtype)


def dequantize_int4_packed(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                           k: int, block_size: int | None, signed: bool, dtype: torch.dtype) -> torch.Tensor:
    """The canonical ``(C, k)`` weight of int4/uint4-packed bytes: ``(code - zero_point) * scale``."""
    values = lookup_values(packed, k, "int4" if signed else "uint4")
    return _scaled(values, scale, block_size, zero_point).to(dtype)
