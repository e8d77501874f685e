"""Activation observers: ranges against numpy, exact merging, errors."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphlora.errors import CalibrationError, QuantizationError
from graphlora.quant import (
    HistogramObserver,
    MinMaxObserver,
    get_qtype,
    make_observer,
    reduce_observers,
    with_grid,
)


def _data(n=50_000, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0.3, 1.5, n), rng.standard_t(2, 200) * 5]).astype(np.float32)
    rng.shuffle(x)
    return x


def _feed(obs, x: np.ndarray, chunks=5):
    for c in np.array_split(x, chunks):
        out = obs(torch.from_numpy(c).reshape(-1, 1))
        assert torch.equal(out, torch.from_numpy(c).reshape(-1, 1))  # forward is the identity
    return obs


def test_minmax_matches_numpy_and_encoding_formula():
    x = _data()
    obs = _feed(MinMaxObserver("blk.0.out"), x)
    assert float(obs.min_val) == x.min() and float(obs.max_val) == x.max()
    enc = obs.compute_encoding("uint8", symmetric=False)
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = np.float32((hi - lo) / 255)
    assert enc.scale.item() == pytest.approx(scale, rel=1e-6)
    assert enc.zero_point.item() == int(np.clip(np.rint(-lo / scale), 0, 255))
    enc = obs.compute_encoding("int16", symmetric=True, grid="restricted")
    assert enc.zero_point is None
    assert enc.scale.item() == pytest.approx(max(abs(x.min()), abs(x.max())) / 32767, rel=1e-6)
    enc = obs.compute_encoding("int16", symmetric=True)  # the full grid (default): -32768 usable
    assert enc.scale.item() == pytest.approx(max(-min(x.min(), 0) / 32768, max(x.max(), 0) / 32767), rel=1e-6)
    assert enc.granularity == "PER_TENSOR" and enc.name == "blk.0.out"


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy_within_bin_width(p):
    x = _data()
    obs = _feed(HistogramObserver(mode="percentile", percentile=p), x)
    w = obs.bin_width
    lo, hi = obs.compute_range(get_qtype("uint8"), symmetric=False)
    assert abs(hi - np.percentile(x, p)) <= 2 * w
    assert abs(lo - np.percentile(x, 100 - p)) <= 2 * w
    # the restricted grid mirrors the range: the percentile of |x|
    _, a = obs.compute_range(with_grid("int8", "restricted"), symmetric=True)
    assert abs(a - np.percentile(np.abs(x), p)) <= 2 * w
    enc = obs.compute_encoding("int8", symmetric=True, grid="restricted")
    assert enc.scale.item() == pytest.approx(a / 127, rel=1e-6)
    # the full grid: each side's observed extent capped at that percentile of |x|; scale
    # max(|lo| / 128, hi / 127)
    lo_f, hi_f = obs.compute_range(get_qtype("int8"), symmetric=True)
    assert lo_f == pytest.approx(max(-a, min(x.min(), 0.0))) and hi_f == pytest.approx(min(a, x.max()))
    enc = obs.compute_encoding("int8", symmetric=True, grid="full")
    assert enc.scale.item() == pytest.approx(max(-lo_f / 128, hi_f / 127), rel=1e-6)


def _np_qdq(x, lo, hi, qmin, qmax, symmetric):
    if symmetric:
        s = np.float32(max(abs(lo), abs(hi)) / qmax)
        return np.clip(np.rint(x / s), qmin, qmax) * s
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = np.float32((hi - lo) / (qmax - qmin))
    z = np.clip(np.rint(qmin - lo / s), qmin, qmax)
    return (np.clip(np.rint(x / s) + z, qmin, qmax) - z) * s


@pytest.mark.parametrize("qname,qmin,qmax,symmetric", [("uint8", 0, 255, False), ("int8", -128, 127, True)])
def test_mse_observer_close_to_numpy_brute_force(qname, qmin, qmax, symmetric):
    x = _data()
    obs = _feed(HistogramObserver(mode="mse"), x)
    lo, hi = obs.compute_range(get_qtype(qname), symmetric)
    ours = np.mean((_np_qdq(x, lo, hi, qmin, qmax, symmetric) - x) ** 2)
    lo0, hi0 = float(x.min()), float(x.max())
    errs = [np.mean((_np_qdq(x, lo0 * r, hi0 * r, qmin, qmax, symmetric) - x) ** 2)
            for r in np.linspace(1.0, 0.01, 100)]
    assert ours <= min(errs) * 1.05
    full = errs[0]
    assert ours < full  # the heavy tail makes clipping worthwhile


@st.composite
def sharded_batches(draw):
    n_batches = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        scale = 10.0 ** draw(st.integers(-3, 3))  # ranges that force rebinning
        size = draw(st.integers(0, 300))
        batches.append((rng.standard_normal(size) * scale + draw(st.floats(-5, 5))).astype(np.float32))
    ranks = draw(st.lists(st.integers(0, 2), min_size=n_batches, max_size=n_batches))
    return batches, ranks


@settings(max_examples=50, deadline=None)
@given(sharded_batches(), st.sampled_from(["minmax", "percentile", "mse"]))
def test_merged_state_equals_single_process(case, kind):
    batches, ranks = case
    single = make_observer(kind, bins=256) if kind != "minmax" else make_observer(kind)
    for b in batches:
        single.observe(torch.from_numpy(b))
    per_rank = [copy.deepcopy(make_observer(kind, bins=256) if kind != "minmax" else make_observer(kind))
                for _ in range(3)]
    # each rank sees its batches in reverse order: order must not matter either
    for b, r in reversed(list(zip(batches, ranks))):
        per_rank[r].observe(torch.from_numpy(b))
    reduce_observers(per_rank)
    for obs in per_rank:
        s, m = single.state_tensors(), obs.state_tensors()
        assert s.keys() == m.keys()
        for k in s:
            assert torch.equal(s[k], m[k]), k
    if int(single.count) and any(b.size and np.abs(b).max() > 0 for b in batches):
        e1, e2 = single.compute_encoding("uint8"), per_rank[0].compute_encoding("uint8")
        assert torch.equal(e1.scale, e2.scale) and torch.equal(e1.zero_point, e2.zero_point)


def test_pairwise_merge_and_reduce_ops():
    a, b, single = (HistogramObserver(mode="percentile") for _ in range(3))
    x1, x2 = torch.randn(1000) * 0.01, torch.randn(1000) * 100
    a(x1), b(x2), single(x1), single(x2)
    a.merge(b)
    assert torch.equal(a.hist, single.hist) and int(a.exponent) == int(single.exponent)
    assert int(b.count) == 1000  # merge leaves the other observer untouched
    assert a.reduce_ops() == {"exponent": "max", "min_val": "min", "max_val": "max",
                              "count": "sum", "hist": "sum"}
    assert [list(p) for p in a.reduce_phases()] == [["exponent", "min_val", "max_val", "count"],
                                                    ["hist"]]
    assert MinMaxObserver().reduce_ops() == {"min_val": "min", "max_val": "max", "count": "sum"}
    assert set(a.state_dict()) >= {"hist", "exponent", "min_val", "max_val", "count"}


def test_histogram_bins_are_exact_power_of_two_grid():
    obs = HistogramObserver(bins=8)
    obs(torch.tensor([0.75, -0.25, 0.0]))  # max |x| = 0.75 < 2**0 -> R = 1, bin width 0.25
    assert int(obs.exponent) == 0 and obs.bin_width == 0.25
    assert obs.hist.tolist() == [0, 0, 0, 1, 1, 0, 0, 1]
    obs(torch.tensor([3.0]))  # R grows to 4, width 1: bins merge in pairs around 0
    assert int(obs.exponent) == 2
    assert obs.hist.tolist() == [0, 0, 0, 1, 2, 0, 0, 1]


def test_errors():
    obs = MinMaxObserver("decoder.layers.3.mlp")
    with pytest.raises(CalibrationError, match="decoder.layers.3.mlp"):
        obs.compute_encoding("uint8")
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        obs(torch.tensor([1.0, float("inf")]))
    h = HistogramObserver("site.x")
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        h(torch.tensor([float("nan")]))
    with pytest.raises(CalibrationError, match="no values"):
        h.compute_encoding("uint8")
    h(torch.randn(10))
    with pytest.raises(QuantizationError, match="activation"):
        h.compute_encoding("nf4", symmetric=True)
    with pytest.raises(CalibrationError, match="unknown observer"):
        make_observer("kl")
    with pytest.raises(CalibrationError, match="power of two"):
        HistogramObserver(bins=100)
