"""GPTQ against round-to-nearest, and the Hessian accumulator against numpy."""

import numpy as np
import pytest
import torch

from graphlora.errors import CalibrationError, QuantizationError
from graphlora.quant import HessianAccumulator, calibrate_weight, gptq_quantize


def _correlated_inputs(n=2048, k=128, rank=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, k, generator=g) + 0.1 * torch.randn(
        n, k, generator=g)


@pytest.mark.parametrize(
    "qname,method,block,axis",
    [("int4", "absmax", None, 0), ("int4", "absmax", 32, 0), ("uint4", "minmax", 32, 0),
     ("int4", "mse", 64, 1), ("nf4", "absmax", 64, 0), ("int8", "absmax", None, 0)],
)
def test_gptq_beats_round_to_nearest(qname, method, block, axis):
    x = _correlated_inputs()
    w = torch.randn(64, 128)
    acc = HessianAccumulator(128)
    acc.add(x.reshape(4, 512, 128))  # any leading shape
    w_stored = w if axis == 0 else w.t().contiguous()
    res = gptq_quantize(w_stored, acc.hessian(), qname, axis=axis, block_size=block, method=method)
    rtn_enc = calibrate_weight(w_stored, qname, method=method, axis=axis, block_size=block)
    rtn = rtn_enc.dequantize(rtn_enc.quantize(w_stored))
    w_hat, w_rtn = (res.weight, rtn) if axis == 0 else (res.weight.t(), rtn.t())
    err_gptq = torch.linalg.norm(x @ w.t() - x @ w_hat.t())
    err_rtn = torch.linalg.norm(x @ w.t() - x @ w_rtn.t())
    assert err_gptq < 0.9 * err_rtn
    # the returned weight lies on the encoding's grid and the codes reproduce it
    assert torch.equal(res.encoding.dequantize(res.codes), res.weight)
    assert res.encoding.granularity == ("PER_BLOCK" if block else "PER_CHANNEL")


def test_hessian_accumulator_matches_numpy_and_merges():
    xs = [torch.randn(3, 7, 10), torch.randn(5, 10), torch.randn(2, 2, 2, 10)]
    acc = HessianAccumulator(10)
    for x in xs:
        acc.add(x)
    flat = np.concatenate([x.reshape(-1, 10).double().numpy() for x in xs])
    np.testing.assert_allclose(acc.hessian().numpy(), 2 * flat.T @ flat / flat.shape[0], rtol=1e-12)
    a, b = HessianAccumulator(10), HessianAccumulator(10)
    a.add(xs[0])
    b.add(xs[1])
    b.add(xs[2])
    a.merge(b)
    torch.testing.assert_close(a.hessian(), acc.hessian(), rtol=1e-12, atol=1e-12)
    assert a.reduce_ops() == {"xtx": "sum", "n": "sum"}
    f32 = HessianAccumulator(10, dtype=torch.float32)
    f32.add(xs[0])
    assert f32.hessian().dtype == torch.float32


def test_dead_input_columns_are_zeroed():
    x = _correlated_inputs(k=32)
    x[:, 5] = 0.0
    acc = HessianAccumulator(32)
    acc.add(x)
    res = gptq_quantize(torch.randn(8, 32), acc.hessian(), "int4", block_size=16)
    assert torch.isfinite(res.weight).all()
    assert torch.all(res.weight[:, 5] == 0)


def test_errors():
    acc = HessianAccumulator(4, name="mlp.fc1")
    with pytest.raises(CalibrationError, match="mlp.fc1"):
        acc.hessian()
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        acc.add(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(CalibrationError, match="features"):
        acc.add(torch.randn(2, 5))
    w = torch.randn(3, 4)
    w[0, 0] = float("inf")
    with pytest.raises(QuantizationError, match="mlp.fc1.weight"):
        gptq_quantize(w, torch.eye(4), "int4", name="mlp.fc1.weight")
    with pytest.raises(QuantizationError, match="Hessian shape"):
        gptq_quantize(torch.randn(3, 4), torch.eye(5), "int4")
    with pytest.raises(QuantizationError, match="fp8"):
        gptq_quantize(torch.randn(3, 4), torch.eye(4), "fp8_e4m3")
