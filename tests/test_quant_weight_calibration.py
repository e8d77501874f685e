"""Weight calibration (absmax, minmax, mse) against independent numpy computations."""


import numpy as np
import pytest
import torch

from graphlora.errors import QuantizationError
from graphlora.quant import calibrate_weight, get_qtype


def _np_groups(w: np.ndarray, block):
    """(C, G, g) view of an (out, in) weight, zero-padded, computed with numpy."""
    c, k = w.shape
    if block is None:
        return w[:, None, :]
    g = -(-k // block)
    padded = np.zeros((c, g * block), dtype=w.dtype)
    padded[:, :k] = w
    return padded.reshape(c, g, block)


@pytest.mark.parametrize("qname", ["int4", "int8"])
@pytest.mark.parametrize("block", [None, 16, 64])
def test_absmax_scale_matches_numpy(qname, block):
    w = torch.randn(32, 200)
    enc = calibrate_weight(w, qname, method="absmax", block_size=block, grid="restricted")
    qmax = {"int4": 7, "int8": 127}[qname]
    expected = np.abs(_np_groups(w.numpy(), block)).max(axis=-1) / qmax
    np.testing.assert_allclose(enc.scale.numpy().reshape(expected.shape), expected, rtol=1e-6)
    assert enc.zero_point is None and enc.symmetric
    assert enc.grid == "restricted" and enc.qtype.qmin == -qmax


@pytest.mark.parametrize("qname", ["int4", "int8"])
@pytest.mark.parametrize("block", [None, 16])
def test_full_grid_scale_is_aimets(qname, block):
    """AIMET's symmetric grid: scale max(|min| / 2**(b-1), max / (2**(b-1) - 1)), codes from
    -2**(b-1): the most negative value of a group may use the extra code."""
    w = torch.randn(32, 200)
    enc = calibrate_weight(w, qname, method="absmax", block_size=block, grid="full")
    half = {"int4": 8, "int8": 128}[qname]
    g = _np_groups(w.numpy(), block)
    expected = np.maximum(-np.minimum(g.min(axis=-1), 0) / half, np.maximum(g.max(axis=-1), 0) / (half - 1))
    np.testing.assert_allclose(enc.scale.numpy().reshape(expected.shape), expected, rtol=1e-6)
    codes = enc.quantize(w)
    assert enc.grid == "full" and int(codes.min()) >= -half and int(codes.max()) <= half - 1
    # where a group's minimum is its absmax, that minimum lands exactly on the code -2**(b-1)
    neg = torch.from_numpy(-g.min(axis=-1) > g.max(axis=-1))
    assert bool(neg.any()) and int(codes.min()) == -half
    # never coarser than the restricted grid, and strictly finer where the minimum dominates
    restricted = calibrate_weight(w, qname, method="absmax", block_size=block, grid="restricted")
    assert bool((enc.scale <= restricted.scale * (1 + 1e-6)).all())
    assert bool((enc.scale.reshape(neg.shape)[neg] < restricted.scale.reshape(neg.shape)[neg]).all())


@pytest.mark.parametrize("qname", ["uint4", "uint8", "int8"])
@pytest.mark.parametrize("block", [None, 32])
def test_minmax_scale_and_zero_point_match_numpy(qname, block):
    w = torch.randn(16, 100) * 0.5 + 0.2
    enc = calibrate_weight(w, qname, method="minmax", block_size=block)
    q = get_qtype(qname)
    g = _np_groups(w.numpy(), block)
    lo, hi = np.minimum(g.min(axis=-1), 0), np.maximum(g.max(axis=-1), 0)
    scale = ((hi - lo) / (q.qmax - q.qmin)).astype(np.float32)
    zp = np.clip(np.rint(q.qmin - lo / scale), q.qmin, q.qmax)
    np.testing.assert_allclose(enc.scale.numpy().reshape(scale.shape), scale, rtol=1e-6)
    np.testing.assert_array_equal(enc.zero_point.numpy().reshape(zp.shape), zp)
    assert not enc.symmetric


def _np_qdq_sym(x, scale, qmin, qmax):
    return np.clip(np.rint(x / scale), qmin, qmax) * scale


@pytest.mark.parametrize("grid", ["restricted", "full"])
@pytest.mark.parametrize("block", [None, 32])
def test_mse_matches_numpy_brute_force(block, grid):
    rng = np.random.default_rng(1)
    w = rng.standard_t(df=3, size=(24, 96)).astype(np.float32)  # heavy tails: clipping pays off
    enc = calibrate_weight(torch.from_numpy(w), "int4", method="mse", block_size=block, grid=grid)
    g = _np_groups(w, block)
    qmin = -7 if grid == "restricted" else -8
    if grid == "restricted":  # the mirrored range [-max|w|, max|w|] on -7..7
        lo = -np.abs(g).max(axis=-1, keepdims=True)
        hi = -lo
    else:  # the group's own [min, max] on -8..7
        lo = np.minimum(g.min(axis=-1, keepdims=True), 0)
        hi = np.maximum(g.max(axis=-1, keepdims=True), 0)

    def scale(r):
        return np.maximum(-lo * np.float32(r) / -qmin, hi * np.float32(r) / 7).astype(np.float32)

    errs = []
    for r in np.linspace(1.0, 0.5, 100):
        errs.append(((_np_qdq_sym(g, scale(r), qmin, 7) - g) ** 2).sum(axis=-1))
    best_np = np.min(np.stack(errs), axis=0)
    s_ours = enc.scale.numpy().reshape(best_np.shape)[..., None]
    ours = ((_np_qdq_sym(g, s_ours, qmin, 7) - g) ** 2).sum(axis=-1)
    np.testing.assert_allclose(ours, best_np, rtol=1e-4, atol=1e-9)
    # and it beats the unclipped range overall
    absmax_err = ((_np_qdq_sym(g, scale(1.0), qmin, 7) - g) ** 2).sum()
    assert ours.sum() < absmax_err


@pytest.mark.parametrize("qname,method", [("uint4", "mse"), ("nf4", "mse"), ("fp8_e4m3", "mse")])
def test_mse_never_worse_than_full_range(qname, method):
    w = torch.randn(16, 64) ** 3
    full = calibrate_weight(w, qname, method="minmax" if qname == "uint4" else "absmax", block_size=None)
    mse = calibrate_weight(w, qname, method=method)
    err = lambda e: float((e.dequantize(e.quantize(w)) - w).pow(2).sum())
    assert err(mse) <= err(full) * (1 + 1e-6)


def test_per_tensor_and_conv_weights():
    w = torch.randn(8, 3, 3, 3)  # conv weight: per-channel over axis 0, rest flattened
    enc = calibrate_weight(w, "int8", grid="restricted")
    np.testing.assert_allclose(enc.scale.numpy(), np.abs(w.numpy()).reshape(8, -1).max(1) / 127,
                               rtol=1e-6)
    pt = calibrate_weight(w, "int8", axis=None, grid="restricted")
    assert pt.scale.dim() == 0 and pt.scale.item() == pytest.approx(float(w.abs().max()) / 127)
    full = calibrate_weight(w, "int8", axis=None)  # the default grid
    assert full.scale.item() == pytest.approx(max(-float(w.min()) / 128, float(w.max()) / 127))


def test_bad_arguments():
    w = torch.randn(4, 8)
    with pytest.raises(QuantizationError, match="unknown weight calibration method"):
        calibrate_weight(w, "int8", method="kl")
    with pytest.raises(QuantizationError, match="symmetric"):
        calibrate_weight(w, "int8", method="absmax", symmetric=False)
    with pytest.raises(QuantizationError, match="nf4"):
        calibrate_weight(w, "int4", block_size=4, double_quant=True)
    with pytest.raises(QuantizationError, match="2-D"):
        calibrate_weight(torch.randn(2, 3, 4), "int4", block_size=2)
