"""SeqMSE and AdaRound (graphlora.quant.seqmse): weight encodings chosen by the layer's output
error on calibration inputs, as registry methods a rule names (QW-LoRA step 1 included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphlora
from graphlora import QuantRule
from graphlora.errors import CalibrationError, InputError
from graphlora.quant import adaround_quantize, calibrate_weight, seqmse_quantize
from toy_models import MLP


def _inputs(n=256, k=64, seed=0):
    """Correlated inputs with a few dominant features: where output error and weight error differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    x[:, :4] *= 6.0
    return x


def _output_error(w_hat, w, x):
    d = (np.asarray(w_hat, np.float64) - np.asarray(w, np.float64)) @ np.asarray(x, np.float64).T
    return (d ** 2).sum(axis=1)  # per output channel


def _hessian(x):
    return 2.0 * x.T @ x / x.shape[0]


def test_seqmse_per_channel_is_the_best_clipping_for_the_output_numpy():
    """Per output channel, SeqMSE's weight has the lowest output error ||(W - Ŵ) X^T||² of the
    100 clippings 1.0 .. 0.5 of the full int4 grid's range (numpy brute force)."""
    x = _inputs()
    w = torch.randn(12, 64) * 0.1
    res = seqmse_quantize(w, _hessian(x), "int4", axis=0)
    wn, xn = w.numpy().astype(np.float64), x.numpy()
    lo, hi = np.minimum(wn.min(1, keepdims=True), 0), np.maximum(wn.max(1, keepdims=True), 0)
    best = np.full(12, np.inf)
    for r in np.linspace(1.0, 0.5, 100):
        s = np.maximum(-lo * r / 8, hi * r / 7)
        best = np.minimum(best, _output_error(np.clip(np.rint(wn / s), -8, 7) * s, wn, xn))
    ours = _output_error(res.weight.numpy(), wn, xn)
    np.testing.assert_allclose(ours, best, rtol=1e-3)
    # and the weight is on its own encoding's grid
    assert torch.equal(res.encoding.dequantize(res.encoding.quantize(res.weight)), res.weight)
    # output error, not weight error: on these inputs it beats the weight-mse clipping
    mse = calibrate_weight(w, "int4", method="mse", axis=0)
    assert ours.sum() < _output_error(mse.dequantize(mse.quantize(w)).numpy(), wn, xn).sum()


def test_adaround_keeps_the_scales_moves_each_weight_at_most_one_step_and_lowers_the_output_error():
    x = _inputs(seed=1)
    w = torch.randn(16, 64) * 0.1
    res = adaround_quantize(w, _hessian(x), "int4", axis=0, block_size=32, iterations=200)
    init = calibrate_weight(w, "int4", method="mse", axis=0, block_size=32)
    assert torch.equal(res.encoding.scale, init.scale)
    step = init.scale.repeat_interleave(32, dim=1)
    assert bool(((res.weight - w).abs() <= step * (1 + 1e-5)).all())  # floor or ceil, never further
    rtn = init.dequantize(init.quantize(w))
    assert not torch.equal(res.weight, rtn)  # it did choose other roundings
    assert _output_error(res.weight, w, x).sum() < 0.9 * _output_error(rtn, w, x).sum()


@pytest.mark.parametrize("method", ["seqmse", "adaround"])
def test_rules_name_the_method_and_transform_runs_it_on_calibration_data(method):
    torch.manual_seed(0)
    model = MLP(dims=(64, 32, 8)).eval()
    x = _inputs(n=128, seed=2)
    batches = [(x[i:i + 32],) for i in range(0, 128, 32)]
    rule = QuantRule(r"layers\.0", weight_qtype="int4", weight_calibration=method)
    with pytest.raises((CalibrationError, InputError), match=f"{method.upper()} needs calibration data"):
        graphlora.transform(model, [rule], (x[:2],), progress=False)
    lm = graphlora.transform(model, [rule], (x[:2],), calibration_data=batches, progress=False)
    mse = graphlora.transform(model, [QuantRule(r"layers\.0", weight_qtype="int4", weight_calibration="mse")],
                              (x[:2],), progress=False)
    w = model.layers[0].weight.detach()
    ours = lm.base_state_dict()["layers.0.weight"]
    theirs = mse.base_state_dict()["layers.0.weight"]
    assert not torch.equal(ours, theirs)
    assert _output_error(ours, w, x).sum() < _output_error(theirs, w, x).sum()
    assert lm.encodings()["layers.0.weight"].qtype.name == "int4"


def test_qw_lora_step_1_with_seqmse():
    torch.manual_seed(0)
    x = _inputs(n=64, seed=3)
    flow = graphlora.qw_lora(MLP(dims=(64, 32, 8)), [graphlora.LoraRule(r"layers\.\d", rank=2, weight_qtype="int4",
                                                                        group_size=16)], (x[:2],))
    with pytest.raises(InputError, match="SEQMSE"):
        flow.quantize_base(method="seqmse", progress=False)
    flow.quantize_base(method="seqmse", calibration_data=[(x,)], progress=False)
    encs = flow.model.encodings()
    assert {"layers.0.weight", "layers.1.weight"} <= set(encs)
    assert encs["layers.0.weight"].block_size == 16
