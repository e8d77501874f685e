"""Memory accounting: how many bytes a quantized tensor and its parameters occupy.

Counted the way graphlora stores them: 4-bit codes as ``(C, ceil(K/2))`` packed bytes (odd rows
padded), other codes at their nominal width, scales at their stored dtype (float32 or float16) or,
with double quantization, as int8 codes + float32 second-level scales + one float32 mean, and zero
points at the qtype's width (4-bit zero points packed two per byte, as ONNX and MatMulNBits store
them).

Measured on a 1024 x 1024 weight with group size 64 (tests/test_quant_memory.py):

* int4/nf4, symmetric, float16 scales: 4 + 16/64 = 4.25 bits/param (meets the 4.25 budget);
* nf4, float32 absmax + double quantization: 4 + 8/64 + 32/(64*256) ≈ 4.127 bits/param;
* uint4 asymmetric, float16 scales + 4-bit zero points: 4.3125 bits/param (over budget);
* int4/nf4 with plain float32 scales: 4.5 bits/param.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from graphlora.quant.encoding import Encoding


def storage_breakdown(enc: Encoding) -> dict[str, float]:
    """Bytes of codes, scales and zero points, their total and the bits per parameter."""
    numel = max(enc.numel, 1)
    q = enc.qtype
    if q.packed:
        c = enc.shape[enc.layout_axis] if enc.shape else 1
        k = numel // c
        code_bytes = c * math.ceil(k / 2)
    else:
        code_bytes = math.ceil(numel * q.bits / 8)
    if enc.double_quant is not None:
        scale_bytes = enc.double_quant.nbytes
    else:
        scale_bytes = enc.scale.numel() * enc.scale.element_size()
    zp_bytes = 0 if enc.zero_point is None else math.ceil(enc.zero_point.numel() * q.bits / 8)
    total = code_bytes + scale_bytes + zp_bytes
    return {
        "code_bytes": code_bytes,
        "scale_bytes": scale_bytes,
        "zero_point_bytes": zp_bytes,
        "total_bytes": total,
        "bits_per_param": 8 * total / numel,
    }


def bits_per_param(enc: Encoding) -> float:
    """Stored bits per parameter of a tensor quantized with ``enc``, parameters included."""
    return storage_breakdown(enc)["bits_per_param"]
