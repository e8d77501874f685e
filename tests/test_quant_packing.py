"""4-bit packing: low nibble first (or high first, bitsandbytes' order), odd lengths padded, two's
complement for int4."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphlora.errors import QuantizationError
from graphlora.quant import pack_4bit, packed_length, unpack_4bit


def _reference_pack(codes: np.ndarray, high_first: bool = False) -> np.ndarray:
    """Independent packing of a 1-D array: byte i = (c[2i] & 0xF) | (c[2i+1] & 0xF) << 4, or
    (c[2i] & 0xF) << 4 | (c[2i+1] & 0xF) with ``high_first``."""
    c = [int(v) & 0xF for v in codes]
    if len(c) % 2:
        c.append(0)
    if high_first:
        return np.array([(c[i] << 4) | c[i + 1] for i in range(0, len(c), 2)], dtype=np.uint8)
    return np.array([c[i] | (c[i + 1] << 4) for i in range(0, len(c), 2)], dtype=np.uint8)


def test_literal_layout():
    assert pack_4bit(torch.tensor([1, 2], dtype=torch.uint8)).tolist() == [0x21]
    assert pack_4bit(torch.tensor([15, 0, 7], dtype=torch.uint8)).tolist() == [0x0F, 0x07]
    # int4: -1 -> 0xF, -8 -> 0x8 (two's complement nibbles)
    assert pack_4bit(torch.tensor([-1, 3], dtype=torch.int8)).tolist() == [0x3F]
    assert pack_4bit(torch.tensor([-8, -1, 7], dtype=torch.int8)).tolist() == [0xF8, 0x07]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-8, 7), min_size=1, max_size=65))
def test_signed_round_trip(values):
    codes = torch.tensor(values, dtype=torch.int8)
    packed = pack_4bit(codes)
    assert packed.shape == (packed_length(len(values)),)
    np.testing.assert_array_equal(packed.numpy(), _reference_pack(np.array(values)))
    back = unpack_4bit(packed, len(values), signed=True)
    assert back.dtype == torch.int8
    assert back.tolist() == values


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 7), st.integers(1, 33), st.data())
def test_unsigned_2d_round_trip(rows, cols, data):
    values = data.draw(st.lists(st.integers(0, 15), min_size=rows * cols, max_size=rows * cols))
    codes = torch.tensor(values, dtype=torch.uint8).reshape(rows, cols)
    packed = pack_4bit(codes)
    assert packed.shape == (rows, (cols + 1) // 2)
    for r in range(rows):
        np.testing.assert_array_equal(packed[r].numpy(), _reference_pack(codes[r].numpy()))
    assert torch.equal(unpack_4bit(packed, cols, signed=False), codes)


def test_high_first_literal_layout():
    """bitsandbytes' order (what onnxruntime's MatMulBnb4 reads): first code in the HIGH nibble."""
    assert pack_4bit(torch.tensor([1, 2], dtype=torch.uint8), high_first=True).tolist() == [0x12]
    assert pack_4bit(torch.tensor([15, 0, 7], dtype=torch.uint8), high_first=True).tolist() == [
        0xF0, 0x70]
    assert pack_4bit(torch.tensor([-1, 3], dtype=torch.int8), high_first=True).tolist() == [0xF3]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5), st.integers(1, 33), st.booleans(), st.data())
def test_high_first_round_trip(rows, cols, signed, data):
    lo, hi = (-8, 7) if signed else (0, 15)
    values = data.draw(st.lists(st.integers(lo, hi), min_size=rows * cols, max_size=rows * cols))
    codes = torch.tensor(values, dtype=torch.int8 if signed else torch.uint8).reshape(rows, cols)
    packed = pack_4bit(codes, high_first=True)
    for r in range(rows):
        np.testing.assert_array_equal(packed[r].numpy(),
                                      _reference_pack(codes[r].numpy(), high_first=True))
    # the same bytes as the default order with the two nibbles of each byte swapped
    default = pack_4bit(codes)
    assert torch.equal(packed, (default >> 4) | ((default & 0xF) << 4))
    assert torch.equal(unpack_4bit(packed, cols, signed=signed, high_first=True), codes)


def test_out_of_range_codes_raise():
    with pytest.raises(QuantizationError, match=r"\[-8, 7\]"):
        pack_4bit(torch.tensor([8], dtype=torch.int8))
    with pytest.raises(QuantizationError, match=r"\[0, 15\]"):
        pack_4bit(torch.tensor([16], dtype=torch.uint8))
    with pytest.raises(QuantizationError):
        pack_4bit(torch.tensor([0.5]))


def test_unpack_checks_length():
    with pytest.raises(QuantizationError, match="expected 2 bytes"):
        unpack_4bit(torch.zeros(3, dtype=torch.uint8), 4, signed=False)
