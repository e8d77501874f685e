"""Activation calibration: observers in, data through, fake-quant with the right encodings out."""

import numpy as np
import pytest
import torch

import graphlora
from graphlora import CalibrationError, LoraRule, QuantRule
from graphlora.meta import role
from toy_models import MLP, SharedWeight, ids


def _data(n=6, seed=0, dim=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, dim, generator=g) * (i + 1),) for i in range(n)]


def _roles(lm):
    return [role(n) for n in lm.graph_module.graph.nodes]


def test_minmax_uint8_matches_numpy():
    model = MLP()
    data = _data()
    lm = graphlora.transform(model, [QuantRule(r"layers\.0", act_qtype="uint8")], (data[0][0],))
    enc = graphlora.calibrate(lm, data, progress=False)["layers.0.input"]
    xs = np.concatenate([d[0].numpy().ravel() for d in data])
    lo, hi = min(xs.min(), 0.0), max(xs.max(), 0.0)
    scale = (hi - lo) / 255
    assert enc.scale.item() == pytest.approx(scale, rel=1e-6)
    assert enc.zero_point.item() == round(-lo / scale)
    assert "observer" not in _roles(lm) and _roles(lm).count("fake_quant") == 1
    # the model now computes with the quantized input
    x = data[0][0]
    s, z = enc.scale.item(), enc.zero_point.item()
    xq = (np.clip(np.round(x.numpy() / s) + z, 0, 255) - z) * s
    h = torch.relu(torch.from_numpy(xq).float() @ model.layers[0].weight.T + model.layers[0].bias)
    for layer in model.layers[1:-1]:
        h = torch.relu(layer(h))
    torch.testing.assert_close(lm(x), model.layers[-1](h), rtol=1e-5, atol=1e-5)


def test_percentile_clips_outliers():
    model = MLP()
    data = [(torch.cat([torch.randn(999, 8), torch.full((1, 8), 1000.0)]),)]
    lm = graphlora.transform(model, [QuantRule(r"layers\.0", act_qtype="int8", act_symmetric=True, act_calibration="percentile", act_percentile=99.0)], (data[0][0],))
    enc = graphlora.calibrate(lm, data, progress=False)["layers.0.input"]
    ref = np.percentile(np.abs(data[0][0].numpy()), 99.0)
    assert enc.scale.item() * 127 < 10.0  # not stretched to the outlier at 1000
    assert enc.scale.item() * 127 == pytest.approx(ref, rel=0.1)


def test_shared_input_gets_one_observer():
    lm = graphlora.transform(SharedWeight().eval(), [QuantRule("block|head", act_qtype="uint8")], (ids(2, 5, vocab=20),))
    encs = graphlora.calibrate(lm, [(ids(2, 5, vocab=20, seed=s),) for s in range(3)], progress=False)
    assert sorted(encs) == ["block#1.input", "block.input", "head.input"]


def test_no_batches_and_nan_data():
    lm = graphlora.transform(MLP(), [QuantRule(".*", act_qtype="uint8")], (torch.randn(2, 8),))
    with pytest.raises(CalibrationError, match="no batches"):
        graphlora.calibrate(lm, [], progress=False)
    assert "observer" not in _roles(lm)  # a failed calibration leaves no observers behind
    bad = torch.randn(4, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(CalibrationError, match=r"layers\.0\.input"):
        graphlora.calibrate(lm, [(bad,)], progress=False)
    with pytest.raises(CalibrationError, match="nothing to calibrate"):
        graphlora.calibrate(graphlora.transform(MLP(), [LoraRule(".*", rank=2)], (torch.randn(2, 8),)), _data(), progress=False)


def test_lora_branch_observers_weights_and_targets():
    model = MLP()
    rules = [LoraRule(".*", rank=2, act_qtype="uint8", lora_act_qtype="int8", lora_weight_qtype="int8")]
    lm = graphlora.transform(model, rules, (torch.randn(2, 8),))
    with torch.no_grad():
        for p in lm.lora_parameters():
            p.normal_(0, 0.1)
    base = graphlora.calibrate(lm, _data(), targets="base", progress=False)
    assert sorted(base) == ["layers.0.input", "layers.1.input", "layers.2.input"]
    lora = graphlora.calibrate(lm, _data(), targets="lora", progress=False)
    assert sorted(lora) == sorted(
        [f"layers.{i}.lora_A.output" for i in range(3)]
        + [f"layers.{i}.lora_{w}.weight" for i in range(3) for w in "AB"]
    )
    assert lora["layers.0.lora_A.weight"].axis == 0 and lora["layers.0.lora_A.weight"].qtype.name == "int8"
    # branch quantizers carry the adapter, so they leave with the branch
    tags = [n.meta["graphlora"] for n in lm.graph_module.graph.nodes if role(n) == "fake_quant"]
    assert sum(1 for t in tags if t.get("adapter") == "default") == 3 + 6
    assert set(lm.encodings()) >= set(base) | set(lora)
    # QAT: gradients reach the LoRA weights through the fake-quant (straight-through)
    lm.train()
    lm(torch.randn(4, 8)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.lora_parameters())


def test_recalibrate_replaces_existing_encodings():
    lm = graphlora.transform(MLP(), [QuantRule(".*", act_qtype="uint8")], (torch.randn(2, 8),))
    small = graphlora.calibrate(lm, _data(n=1), progress=False)
    again = graphlora.calibrate(lm, _data(n=6), targets="base", recalibrate=True, progress=False)
    assert again["layers.0.input"].scale > small["layers.0.input"].scale
    assert _roles(lm).count("fake_quant") == 3
