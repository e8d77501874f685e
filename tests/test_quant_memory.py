"""Bits per parameter of packed storage + parameters, against the analytic counts."""

import math

import pytest
import torch

from graphlora.quant import bits_per_param, calibrate_weight, storage_breakdown

OUT, IN, G = 1024, 1024, 64
N = OUT * IN


@pytest.fixture(scope="module")
def w():
    return torch.randn(OUT, IN)


def test_int4_and_nf4_with_fp16_scales_reach_4_25(w):
    for qname in ("int4", "nf4"):
        enc = calibrate_weight(w, qname, block_size=G, scale_dtype=torch.float16)
        assert bits_per_param(enc) == pytest.approx(4 + 16 / G)  # = 4.25
        assert bits_per_param(enc) <= 4.25
        packed = enc.quantize_to_storage(w)
        assert packed.numel() * packed.element_size() == N // 2


def test_nf4_double_quant_fp32_reaches_below_4_25(w):
    enc = calibrate_weight(w, "nf4", block_size=G, double_quant=True)
    n_scales = N // G
    expected_bits = 4 * N + 8 * n_scales + 32 * math.ceil(n_scales / 256) + 32
    assert storage_breakdown(enc)["total_bytes"] * 8 == expected_bits
    assert bits_per_param(enc) == pytest.approx(expected_bits / N)  # ~4.127
    assert bits_per_param(enc) <= 4.25
    # double quantization costs little accuracy: within 2% of fp32 absmax
    plain = calibrate_weight(w, "nf4", block_size=G)
    err = lambda e: float((e.dequantize(e.quantize(w)) - w).pow(2).mean())
    assert err(enc) <= err(plain) * 1.02


def test_budget_misses_are_reported(w):
    asym = calibrate_weight(w, "uint4", method="minmax", block_size=G, scale_dtype=torch.float16)
    assert bits_per_param(asym) == pytest.approx(4 + 16 / G + 4 / G)  # 4.3125: zero points cost
    fp32 = calibrate_weight(w, "int4", block_size=G)
    assert bits_per_param(fp32) == pytest.approx(4 + 32 / G)  # 4.5


def test_fp16_scales_keep_the_error_bound(w):
    enc = calibrate_weight(w, "int4", block_size=G, scale_dtype=torch.float16)
    s = enc.scale.float().repeat_interleave(G, dim=1)
    assert torch.all((enc.dequantize(enc.quantize(w)) - w).abs() <= s / 2 * (1 + 1e-6))


def test_odd_rows_pad_one_nibble():
    enc = calibrate_weight(torch.randn(3, 5), "int4", block_size=4)
    b = storage_breakdown(enc)
    assert b["code_bytes"] == 3 * 3  # ceil(5 / 2) bytes per row
    assert b["scale_bytes"] == 3 * 2 * 4
    assert enc.nbytes == b["total_bytes"]
