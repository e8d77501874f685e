"""Two 4-bit codes per byte.

Layout (the ONNX ``INT4``/``UINT4`` tensor and onnxruntime ``MatMulNBits`` convention): along the
last dimension, element ``2*i`` goes to the LOW nibble of byte ``i`` and element ``2*i + 1`` to the
HIGH nibble. A last dimension of odd length is padded with one zero code, so ``(..., n)`` packs to
``(..., ceil(n / 2))``. Signed ``int4`` codes (-8..7) are stored as two's-complement nibbles, so
-1 is ``0xF`` and -8 is ``0x8``. Packing works on the last dimension only: pack a flattened
tensor to get ONNX's whole-tensor packing, or a ``(rows, K)`` matrix to get one padded byte row
per row (the two agree whenever K is even).

``high_first=True`` swaps the two nibbles of every byte: element ``2*i`` in the HIGH nibble. That
is bitsandbytes' order, which onnxruntime's ``MatMulBnb4`` reads.
"""

from __future__ import annotations

import torch

from graphlora.errors import QuantizationError


def packed_length(n: int) -> int:
    """Bytes needed for ``n`` 4-bit codes."""
    return (n + 1) // 2


def pack_4bit(
    codes: torch.Tensor, *, signed: bool | None = None, high_first: bool = False
) -> torch.Tensor:
    """Pack 4-bit codes along the last dimension into ``uint8``.

    ``signed`` defaults to ``codes.is_signed()``; signed codes must lie in [-8, 7], unsigned in
    [0, 15] — anything else raises a QuantizationError rather than wrapping silently.
    ``high_first`` selects the bitsandbytes nibble order (see the module docstring).
    """
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise QuantizationError(f"pack_4bit expects integer codes, got {codes.dtype}")
    if signed is None:
        signed = codes.dtype.is_signed
    lo, hi = (-8, 7) if signed else (0, 15)
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise QuantizationError(
            f"pack_4bit: codes outside [{lo}, {hi}] ({'signed' if signed else 'unsigned'} 4-bit): "
            f"min {int(codes.min())}, max {int(codes.max())}"
        )
    if codes.dim() == 0:
        codes = codes.reshape(1)
    nibbles = codes.to(torch.int16) & 0xF  # two's complement for negatives
    if nibbles.shape[-1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    first = nibbles[..., 0::2]
    second = nibbles[..., 1::2]
    low, high = (second, first) if high_first else (first, second)
    return (low | (high << 4)).to(torch.uint8)


def unpack_4bit(
    packed: torch.Tensor, n: int, *, signed: bool, high_first: bool = False
) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: ``(..., ceil(n/2))`` bytes -> ``(..., n)`` codes.

    Returns ``int8`` codes in [-8, 7] when ``signed``, else ``uint8`` codes in [0, 15].
    """
    if packed.dtype != torch.uint8:
        raise QuantizationError(f"unpack_4bit expects uint8 bytes, got {packed.dtype}")
    if packed.shape[-1] != packed_length(n):
        raise QuantizationError(
            f"unpack_4bit: last dimension {packed.shape[-1]} does not hold {n} codes "
            f"(expected {packed_length(n)} bytes)"
        )
    return _unpack(packed, n, signed, high_first)


def _unpack(packed: torch.Tensor, n: int, signed: bool, high_first: bool = False) -> torch.Tensor:
    """Unchecked unpacking (also used inside the custom op kernels)."""
    b = packed.to(torch.int16)
    low = b & 0xF
    high = (b >> 4) & 0xF
    pair = (high, low) if high_first else (low, high)
    codes = torch.stack(pair, dim=-1).flatten(-2)[..., :n]
    if signed:
        return (codes - ((codes & 0x8) << 1)).to(torch.int8)  # sign-extend the nibble
    return codes.to(torch.uint8)
