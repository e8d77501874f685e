"""Encoding numerics: error bounds per qtype and granularity, layouts, storage, serialisation.

Expected values come from independent numpy code (``_np_*`` helpers below) or literature
constants, never from the code under test.
"""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphlora.errors import QuantizationError
from graphlora.quant import NF4_CODEBOOK, Encoding, calibrate_weight, get_qtype

NF4 = np.array(NF4_CODEBOOK, dtype=np.float32)
INT_WEIGHT_QTYPES = ["int4", "uint4", "int8", "uint8"]


def _np_expand(p: np.ndarray, shape, axis, block):
    """Broadcast a parameter array to the full tensor shape, independently of graphlora."""
    if p.ndim == 0:
        return np.broadcast_to(p, shape)
    if block is None:
        view = [1] * len(shape)
        view[axis] = p.shape[0]
        return np.broadcast_to(p.reshape(view), shape)
    k = shape[1 - axis]
    full = p[:, np.arange(k) // block]  # (C, K)
    return full if axis == 0 else full.T


def _np_quantize(x, scale, zp, qmin, qmax):
    q = np.rint(x / scale)  # numpy rint rounds half to even, like ONNX
    if zp is not None:
        q = q + zp
    return np.clip(q, qmin, qmax)


@st.composite
def tensors_and_granularity(draw):
    out_f = draw(st.integers(1, 9))
    in_f = draw(st.integers(1, 70))
    gran = draw(st.sampled_from(["tensor", "channel", "block"]))
    axis = draw(st.sampled_from([0, 1]))
    block = draw(st.sampled_from([4, 8, 32, 64])) if gran == "block" else None
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * magnitude
    if axis == 1:
        w = w.t().contiguous()  # (in, out) layout, channel axis 1
    return w, (None if gran == "tensor" else axis), block


# --------------------------------------------------------------- explicit encodings vs numpy
@settings(max_examples=50, deadline=None)
@given(tensors_and_granularity(), st.sampled_from(INT_WEIGHT_QTYPES), st.integers(0, 2**31 - 1))
def test_affine_codes_match_numpy_and_error_bound(case, qname, seed):
    w, axis, block = case
    q = get_qtype(qname)
    rng = np.random.default_rng(seed)
    if axis is None:
        pshape = ()
    elif block is None:
        pshape = (w.shape[axis],)
    else:
        pshape = (w.shape[axis], math.ceil(w.shape[1 - axis] / block))
    scale = rng.uniform(0.01, 0.5, size=pshape).astype(np.float32) * float(w.abs().max() + 1e-3)
    zp = rng.integers(q.qmin, q.qmax + 1, size=pshape).astype(np.int32)
    enc = Encoding(q, torch.tensor(scale), torch.tensor(zp), axis, block, tuple(w.shape),
                   symmetric=False)
    x = w.numpy()
    s_full = _np_expand(scale, x.shape, axis, block)
    z_full = _np_expand(zp, x.shape, axis, block).astype(np.float32)
    expected = _np_quantize(x, s_full, z_full, q.qmin, q.qmax)
    codes = enc.quantize(w)
    assert codes.dtype == q.code_dtype
    np.testing.assert_array_equal(codes.numpy().astype(np.float32), expected)
    dq = enc.dequantize(codes).numpy()
    lo, hi = (q.qmin - z_full) * s_full, (q.qmax - z_full) * s_full
    inside = (x >= lo) & (x <= hi)
    err = np.abs(x - dq)
    assert np.all(err[inside] <= s_full[inside] / 2 * (1 + 1e-5) + 1e-7)
    # outside the range values saturate at the nearest end
    np.testing.assert_allclose(dq[~inside], np.clip(x, lo, hi)[~inside], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ calibrated encodings, all qtypes
@settings(max_examples=50, deadline=None)
@given(tensors_and_granularity(), st.sampled_from(INT_WEIGHT_QTYPES), st.sampled_from(["absmax", "minmax"]),
       st.sampled_from([torch.float32, torch.float16]))
def test_calibrated_int_error_bound(case, qname, method, scale_dtype):
    w, axis, block = case
    enc = calibrate_weight(w, qname, method=method, axis=axis, block_size=block,
                           scale_dtype=scale_dtype)
    assert enc.scale.dtype == scale_dtype
    x = w.numpy()
    s_full = _np_expand(enc.scale.float().numpy(), x.shape, axis, block)
    dq = enc.dequantize(enc.quantize(w)).numpy()
    # the whole observed range is inside the grid, so every element obeys the bound
    assert np.all(np.abs(x - dq) <= s_full / 2 * (1 + 1e-5) + 1e-30)


@settings(max_examples=50, deadline=None)
@given(tensors_and_granularity(), st.booleans())
def test_nf4_picks_nearest_codebook_entry(case, double_quant):
    w, axis, block = case
    if double_quant and block is None:
        block = 8
        axis = 0 if axis is None else axis
    enc = calibrate_weight(w, "nf4", axis=axis, block_size=block, double_quant=double_quant)
    x = w.numpy()
    a = _np_expand(enc.scale.numpy(), x.shape, axis, block)
    codes = enc.quantize(w).numpy()
    assert codes.max() <= 15
    norm = x / a
    if not double_quant:
        # absmax per block, computed with numpy
        absmax = np.abs(x).max() if axis is None else None
        if axis is None:
            np.testing.assert_allclose(enc.scale.numpy(), absmax, rtol=0)
        assert np.all(np.abs(norm) <= 1 + 1e-6)
    dist = np.abs(np.clip(norm, -1, 1)[..., None] - NF4)  # distance to every entry
    chosen = np.take_along_axis(dist, codes[..., None].astype(np.int64), axis=-1)[..., 0]
    assert np.all(chosen <= dist.min(axis=-1) + 1e-6)
    dq = enc.dequantize(enc.quantize(w)).numpy()
    np.testing.assert_allclose(dq, NF4[codes] * a, rtol=1e-6, atol=0)
    if not double_quant:  # bound: half the widest codebook gap, times absmax
        half_gap = np.max(np.diff(NF4)) / 2
        assert np.all(np.abs(x - dq) <= half_gap * a * (1 + 1e-5) + 1e-30)


@settings(max_examples=30, deadline=None)
@given(tensors_and_granularity())
def test_fp8_relative_error_bound(case):
    w, axis, block = case
    enc = calibrate_weight(w, "fp8_e4m3", axis=axis)
    x = w.numpy()
    s = _np_expand(enc.scale.numpy(), x.shape, axis, None)
    assert np.all(np.abs(x) / s <= 448 * (1 + 1e-6))
    q = enc.quantize(w)
    assert q.dtype == torch.float8_e4m3fn
    dq = enc.dequantize(q).numpy()
    # e4m3: 3 mantissa bits -> relative error <= 2**-4 for normals; subnormal step 2**-9
    bound = np.maximum(np.abs(x) * 2.0**-4, s * 2.0**-10)
    assert np.all(np.abs(x - dq) <= bound * (1 + 1e-5))


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize(
    "qname,block",
    [(q, b) for q in ("int4", "uint4", "int8", "nf4") for b in (None, 32)] + [("fp8_e4m3", None)],
)
def test_in_out_layout_matches_out_in_layout(qname, block):
    w = torch.randn(24, 70)  # K = 70 is not a multiple of 32: last group has 6 elements
    method = "minmax" if qname == "uint4" else "absmax"
    e0 = calibrate_weight(w, qname, method=method, axis=0, block_size=block)
    e1 = calibrate_weight(w.t().contiguous(), qname, method=method, axis=1, block_size=block)
    assert torch.equal(e0.scale, e1.scale)
    dq0 = e0.dequantize(e0.quantize(w))
    dq1 = e1.dequantize(e1.quantize(w.t().contiguous()))
    assert torch.equal(dq0.t(), dq1)
    # storage is the same canonical packing for both layouts
    s0, s1 = e0.quantize_to_storage(w), e1.quantize_to_storage(w.t().contiguous())
    if s0.dtype == torch.float8_e4m3fn:
        assert torch.equal(s0.view(torch.uint8).t(), s1.view(torch.uint8))
    elif e0.qtype.packed:
        assert torch.equal(s0, s1)
        assert s0.shape == (24, 35)
    assert torch.equal(e1.dequantize_storage(s1), dq1)


def test_short_last_group_uses_its_own_absmax():
    w = torch.zeros(2, 10)
    w[0, :8] = 1.0
    w[0, 8:] = torch.tensor([0.25, -0.5])  # last group (size 2) has absmax 0.5
    enc = calibrate_weight(w, "int8", block_size=8, grid="restricted")
    assert enc.scale.shape == (2, 2)
    assert enc.scale[0, 1].item() == pytest.approx(0.5 / 127)
    # on the full grid (the default) the negative side may use -128: scale max(0.5 / 128, 0.25 / 127)
    assert calibrate_weight(w, "int8", block_size=8).scale[0, 1].item() == pytest.approx(0.5 / 128)
    dq = enc.dequantize(enc.quantize(w))
    assert torch.allclose(dq, w, atol=0.5 / 127 / 2 + 1e-7)


# ----------------------------------------------------------------------------- storage
@pytest.mark.parametrize("qname,method", [("int4", "absmax"), ("uint4", "minmax"), ("nf4", "absmax")])
@pytest.mark.parametrize("axis,block", [(0, 16), (0, None), (None, None)])
def test_storage_round_trip_odd_k(qname, method, axis, block):
    w = torch.randn(5, 33)
    enc = calibrate_weight(w, qname, method=method, axis=axis, block_size=block)
    codes = enc.quantize(w)
    storage = enc.pack(codes)
    assert storage.dtype == torch.uint8 and storage.shape == (5, 17)
    assert torch.equal(enc.unpack(storage), codes)
    assert torch.equal(enc.dequantize_storage(storage), enc.dequantize(codes))


def test_symmetric_unsigned_uses_midpoint_zero_point():
    w = torch.tensor([[-1.0, 0.5, 1.0]])
    enc = calibrate_weight(w, "uint8", method="absmax", axis=None)
    assert enc.zero_point.item() == 128
    assert enc.scale.item() == pytest.approx(1.0 / 127)


# ----------------------------------------------------------------------- serialisation
def test_to_dict_aimet_fields_and_offsets():
    w = torch.randn(4, 16) + 0.3
    sym = calibrate_weight(w, "int8", method="absmax", grid="restricted")
    d = sym.to_dict("fc.weight")
    json.dumps(d)
    assert d["name"] == "fc.weight" and d["dtype"] == "INT" and d["enc_type"] == "PER_CHANNEL"
    assert d["bw"] == 8 and d["is_sym"] is True
    assert d["offset"] == [-128] * 4  # AIMET: symmetric 8-bit offset is -2**(bw-1)
    np.testing.assert_allclose(d["scale"], np.abs(w.numpy()).max(axis=1) / 127, rtol=1e-6)

    asym = calibrate_weight(w, "uint8", method="minmax", axis=None)
    d = asym.to_dict("x")
    assert d["enc_type"] == "PER_TENSOR" and d["is_sym"] is False
    # AIMET dequantizes (q + offset) * scale: offset * scale is the bottom of the range
    lo = min(float(w.min()), 0.0)
    assert abs(d["offset"][0] * d["scale"][0] - lo) <= d["scale"][0] / 2 + 1e-6

    blk = calibrate_weight(w, "int4", block_size=8)
    d = blk.to_dict("b")
    assert d["enc_type"] == "PER_BLOCK" and d["block_size"] == 8 and len(d["scale"]) == 8
    assert d["offset"] == [-8] * 8


@pytest.mark.parametrize(
    "qname,kwargs",
    [
        ("int8", {"method": "absmax"}),
        ("uint4", {"method": "minmax", "block_size": 8}),
        ("int4", {"method": "absmax", "block_size": 8, "axis": 1}),
        ("nf4", {"block_size": 8, "double_quant": True}),
        ("nf4", {"block_size": 8, "scale_dtype": torch.float16}),
        ("fp8_e4m3", {}),
        ("uint8", {"method": "minmax", "axis": None}),
    ],
)
def test_dict_round_trip_is_exact(qname, kwargs):
    w = torch.randn(6, 20)
    enc = calibrate_weight(w, qname, **kwargs)
    back = Encoding.from_dict(json.loads(json.dumps(enc.to_dict("w"))))
    assert back.qtype == enc.qtype and back.axis == enc.axis and back.shape == enc.shape
    assert back.block_size == enc.block_size and back.symmetric == enc.symmetric
    assert torch.equal(back.scale, enc.scale) and back.scale.dtype == enc.scale.dtype
    assert (back.zero_point is None) == (enc.zero_point is None)
    if enc.zero_point is not None:
        assert torch.equal(back.zero_point, enc.zero_point)
    a, b = enc.quantize_to_storage(w), back.quantize_to_storage(w)
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    assert torch.equal(a, b)


def test_plain_aimet_entry_is_accepted():
    d = {"name": "act", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": False,
         "scale": [0.1], "offset": [-20]}
    enc = Encoding.from_dict(d)
    assert enc.qtype.name == "uint8" and enc.zero_point.item() == 20
    x = torch.tensor([-2.0, 0.0, 1.0])
    np.testing.assert_allclose(enc.fake_quantize(x).numpy(), [-2.0, 0.0, 1.0], atol=1e-6)


# ------------------------------------------------------------------------------- errors
def test_nan_and_inf_raise_with_name():
    w = torch.randn(3, 4)
    w[1, 2] = float("nan")
    with pytest.raises(QuantizationError, match="layer.q_proj.weight"):
        calibrate_weight(w, "int8", name="layer.q_proj.weight")
    w[1, 2] = float("inf")
    with pytest.raises(QuantizationError, match="NaN/Inf"):
        calibrate_weight(w, "int4", block_size=2)
    enc = calibrate_weight(torch.randn(3, 4), "int8")
    with pytest.raises(QuantizationError, match="NaN"):
        enc.quantize(w)


def test_invalid_encodings_raise():
    q = get_qtype("int8")
    with pytest.raises(QuantizationError, match="> 0"):
        Encoding(q, torch.tensor(0.0))
    with pytest.raises(QuantizationError, match="per-block scale"):
        Encoding(q, torch.ones(3, 3), None, 0, 4, (3, 8))
    with pytest.raises(QuantizationError, match="zero point"):
        Encoding(get_qtype("uint8"), torch.tensor(1.0))
    with pytest.raises(QuantizationError, match="zero_point outside"):
        Encoding(get_qtype("uint4"), torch.tensor(1.0), torch.tensor(16))
    with pytest.raises(QuantizationError, match="shape"):
        calibrate_weight(torch.randn(3, 4), "int8").quantize(torch.randn(4, 3))
    with pytest.raises(QuantizationError, match="unknown qtype"):
        calibrate_weight(torch.randn(3, 4), "int5")
    with pytest.raises(QuantizationError, match="weight"):
        calibrate_weight(torch.randn(3, 4), "int16")
