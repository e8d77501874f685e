"""The table-lookup dequantization kernels equal the closed form bit for bit.

The reference is written out here from the definitions (nibble order, two's complement, the NF4
codebook of the QLoRA paper, per-block scales repeated along the input axis), independent of
``graphlora.quant.lookup`` and of the packing helpers.
"""

import pytest
import torch

from graphlora.quant import ops  # noqa: F401  (registers the ops)
from graphlora.quant.qtypes import NF4_CODEBOOK


def _codes_of(packed: torch.Tensor, k: int, signed: bool) -> torch.Tensor:
    rows = []
    for row in packed.tolist():
        codes = []
        for byte in row:
            codes += [byte & 0xF, byte >> 4]  # element 2i in the low nibble
        codes = codes[:k]
        if signed:
            codes = [c - 16 if c >= 8 else c for c in codes]
        rows.append(codes)
    return torch.tensor(rows, dtype=torch.float32).reshape(packed.shape[0], k)


def _expand(p: torch.Tensor, c: int, k: int, block: int | None) -> torch.Tensor:
    p = p.to(torch.float32)
    if p.dim() == 0:
        return p.expand(c, k)
    if p.dim() == 1:
        return p[:, None].expand(c, k)
    cols = torch.arange(k) // block
    return p[:, cols]


SHAPES = [(8, 64, 16), (5, 33, 8), (3, 7, 4), (12, 40, None), (1, 128, 64)]


@pytest.mark.parametrize("c,k,block", SHAPES)
@pytest.mark.parametrize("layout", ["block", "channel", "tensor"])
def test_nf4_equals_closed_form(c, k, block, layout):
    gen = torch.Generator().manual_seed(c * 100 + k)
    packed = torch.randint(0, 256, (c, (k + 1) // 2), dtype=torch.uint8, generator=gen)
    if layout == "block" and block is not None:
        absmax = torch.rand(c, -(-k // block), generator=gen).half()
    elif layout == "tensor":
        absmax = torch.tensor(0.37)
    else:
        absmax = torch.rand(c, generator=gen) + 0.1
    b = block if absmax.dim() == 2 else None
    got = torch.ops.graphlora.dequantize_nf4(packed, absmax, [c, k], 0, b, torch.float32)
    book = torch.tensor(NF4_CODEBOOK)
    want = book[_codes_of(packed, k, False).long()] * _expand(absmax, c, k, b)
    assert torch.equal(got, want)
    # the same weight stored (in, out), as Conv1D keeps it
    got_t = torch.ops.graphlora.dequantize_nf4(packed, absmax, [k, c], 1, b, torch.float32)
    assert torch.equal(got_t, want.t())


@pytest.mark.parametrize("c,k,block", SHAPES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("zero_point", [False, True])
def test_int4_equals_closed_form(c, k, block, signed, zero_point):
    gen = torch.Generator().manual_seed(c * 7 + k)
    packed = torch.randint(0, 256, (c, (k + 1) // 2), dtype=torch.uint8, generator=gen)
    shape = (c, -(-k // block)) if block else (c,)
    scale = (torch.rand(shape, generator=gen) + 0.05).half()
    zp = None
    if zero_point:
        lo, hi = (-8, 8) if signed else (0, 16)
        zp = torch.randint(lo, hi, shape, generator=gen, dtype=torch.int8 if signed else torch.uint8)
    got = torch.ops.graphlora.dequantize_packed4(packed, scale, zp, [c, k], 0, block, signed, torch.float32)
    v = _codes_of(packed, k, signed)
    if zp is not None:
        v = v - _expand(zp, c, k, block)
    want = v * _expand(scale, c, k, block)
    assert torch.equal(got, want)


def test_half_output_rounds_the_float32_product():
    packed = torch.randint(0, 256, (4, 32), dtype=torch.uint8)
    absmax = torch.rand(4, 2) + 0.5
    got = torch.ops.graphlora.dequantize_nf4(packed, absmax, [4, 64], 0, 32, torch.bfloat16)
    want = (torch.tensor(NF4_CODEBOOK)[_codes_of(packed, 64, False).long()] * _expand(absmax, 4, 64, 32))
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
