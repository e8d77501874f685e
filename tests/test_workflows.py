"""QW-LoRA / QWA-LoRA: three explicit steps, encodings reused exactly, encodings file round trip."""

import json

import pytest
import torch
import torch.nn as nn

import graphlora
from graphlora import LoraRule
from toy_models import MLP


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g),) for _ in range(n)]


def _rules(**kw):
    return [LoraRule(".*", rank=4, weight_qtype="int4", group_size=8, act_qtype="uint8",
                     lora_act_qtype="int8", lora_weight_qtype="int8", **kw)]


def _distill(teacher):
    def loss(model, batch):
        with torch.no_grad():
            target = teacher(*batch)
        return nn.functional.mse_loss(model(*batch), target)
    return loss


def test_qw_lora_three_steps():
    teacher = MLP(dims=(8, 64, 64, 4))
    data = _data()
    flow = graphlora.qw_lora(teacher, _rules(), (data[0][0],), record=True)
    original = {k: v.clone() for k, v in teacher.state_dict().items()}

    enc1 = flow.quantize_base()
    assert sorted(enc1) == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    base = flow.model.base_state_dict()
    for name, enc in enc1.items():
        w = base[name]
        # "apply the encodings to the weights": the float weight lies exactly on the grid
        assert torch.equal(enc.dequantize(enc.quantize(w)), w)
        assert not torch.equal(w, original[name])
    assert set(dict(flow.model.graph_module.named_parameters())) >= set(original)  # original names

    loss_fn = _distill(teacher)
    before = sum(loss_fn(flow.model, b).item() for b in data)
    flow.train(data, loss_fn, steps=60, lr=5e-3, progress=False)
    after = sum(loss_fn(flow.model, b).item() for b in data)
    assert after < 0.7 * before
    assert torch.equal(flow.model.base_state_dict()["layers.0.weight"], base["layers.0.weight"])

    enc3 = flow.ptq(data, act_qtype="int16", progress=False)
    assert {e.qtype.name for n, e in enc3.items() if n.endswith(".input")} == {"int16"}
    assert any(n.endswith("lora_A.output") for n in enc3) and any(n.endswith("lora_B.weight") for n in enc3)
    final = flow.encodings()
    for name, enc in enc1.items():  # base weight encodings reused, not recomputed
        assert final[name] is enc
    names = [r.name for r in flow.model.pass_log]
    assert "QuantizeWeightsPass[float]" in names and "InsertObserversPass[all]" in names
    quant = next(r for r in flow.model.pass_log if r.name == "QuantizeWeightsPass[float]")
    assert "layers.0" in str(quant.diff)


def test_precomputed_encodings_and_file_round_trip(tmp_path):
    teacher = MLP(dims=(8, 32, 4))
    data = _data()
    first = graphlora.qw_lora(teacher, _rules(weight_calibration="mse"), (data[0][0],))
    first.quantize_base()
    first.ptq(data, progress=False)
    path = tmp_path / "encodings.json"
    first.save_encodings(path)
    doc = json.loads(path.read_text())
    assert doc["version"] == "1.0.0"
    param = {e["name"]: e for e in doc["param_encodings"]}
    entry = param["layers.0.weight"]
    assert entry["enc_type"] == "PER_BLOCK" and entry["block_size"] == 8 and entry["bw"] == 4 and entry["is_sym"]
    assert len(entry["scale"]) == 32 * 1 and all(o == -8 for o in entry["offset"])
    assert {e["name"] for e in doc["activation_encodings"]} >= {"layers.0.input", "layers.1.input"}

    loaded = graphlora.load_encodings(path)
    # step 1 with precomputed encodings (a path) gives bit-identical weights
    second = graphlora.qw_lora(teacher, _rules(), (data[0][0],))
    second.quantize_base(encodings=path)
    a, b = first.model.base_state_dict(), second.model.base_state_dict()
    for name in ("layers.0.weight", "layers.1.weight"):
        assert torch.equal(a[name], b[name])
        assert torch.equal(loaded[name].scale, first.encodings()[name].scale)


def test_precomputed_encodings_for_unknown_weight_fail():
    teacher = MLP(dims=(8, 32, 4))
    flow = graphlora.qw_lora(teacher, _rules(), (torch.randn(2, 8),))
    enc = graphlora.quant.calibrate_weight(torch.randn(3, 3), "int4")
    with pytest.raises(graphlora.QuantizationError, match="not matched sites: nowhere.weight"):
        flow.quantize_base(encodings={"nowhere.weight": enc})


def test_qwa_lora_freezes_base_activations_before_training():
    teacher = MLP(dims=(8, 64, 4))
    data = _data()
    flow = graphlora.qwa_lora(teacher, _rules(), (data[0][0],))
    enc1 = flow.quantize_base(calibration_data=data, progress=False)
    base_acts = {k: v for k, v in flow.encodings().items() if k.endswith(".input")}
    assert sorted(base_acts) == ["layers.0.input", "layers.1.input"]
    assert not any("lora" in k for k in flow.encodings())
    flow.train(data, _distill(teacher), steps=20, lr=5e-3, progress=False)  # QAT on a fake-quant base
    enc3 = flow.ptq(data, act_qtype="int16", progress=False)
    assert all("lora" in k for k in enc3)  # only LoRA encodings are calibrated in step 3
    for k, v in base_acts.items():
        assert flow.encodings()[k] is v
    assert set(enc1) <= set(flow.encodings())


def test_steps_run_in_order_and_gptq_needs_data():
    flow = graphlora.qw_lora(MLP(), _rules(), (torch.randn(2, 8),))
    with pytest.raises(graphlora.GraphloraError, match="needs step 'quantize_base' first"):
        flow.ptq(_data())
    with pytest.raises(graphlora.InputError, match="GPTQ"):
        flow.quantize_base(method="gptq")


def test_gptq_step_beats_round_to_nearest():
    torch.manual_seed(0)
    teacher = MLP(dims=(32, 64, 64, 8))
    mix = torch.randn(32, 32)  # correlated inputs: where GPTQ's error compensation pays off
    data = [(torch.randn(64, 32) @ mix,) for _ in range(8)]
    test = torch.randn(256, 32) @ mix
    errors = {}
    for method in ("absmax", "gptq"):
        flow = graphlora.qw_lora(teacher, [LoraRule(".*", rank=2, weight_qtype="int4", group_size=16)], (data[0][0],))
        flow.quantize_base(method=method, calibration_data=data, progress=False)
        errors[method] = (flow.model(test) - teacher(test)).norm().item()
    assert errors["gptq"] < 0.8 * errors["absmax"]


def test_train_lora_keeps_the_best_adapter():
    teacher = MLP()
    lm = graphlora.transform(teacher, [LoraRule(".*", rank=2)], (torch.randn(2, 8),))
    calls = []

    def eval_fn(model):  # gets worse with every evaluation: step 0 must win
        calls.append(1)
        return -len(calls)

    start = {k: v.clone() for k, v in lm.lora_state_dict().items()}
    result = graphlora.train_lora(lm, _data(), _distill(teacher), steps=10, lr=1e-2, eval_fn=eval_fn, eval_every=5, progress=False)
    assert result.best_step == 0 and [s for s, _ in result.evals] == [0, 5, 10]
    for k, v in lm.lora_state_dict().items():
        assert torch.equal(v, start[k])
    with pytest.raises(graphlora.InputError, match="no trainable"):
        graphlora.train_lora(graphlora.transform(teacher, [graphlora.QuantRule(".*", weight_qtype="int8")], (torch.randn(2, 8),)), _data(), _distill(teacher), steps=1)


def test_saving_merged_leaves_the_grid_weights_exportable_quantized(tmp_path):
    """A merged save (and ``merge()``) works on a copy: the QW-LoRA model keeps its base weight
    encodings, so a later ``lora="branch"`` export still stores the base as int4, not float.
    (Regression: the merge pass edited node metadata the copy shared with the model.)"""
    import collections

    import onnx

    data = _data()
    flow = graphlora.qw_lora(MLP(dims=(8, 64, 64, 4)), [LoraRule(".*", rank=4, weight_qtype="int4", group_size=8)],
                             (data[0][0],))
    flow.quantize_base()
    before = {k: (v.qtype.name, v.block_size) for k, v in flow.model.encodings().items()}
    flow.model.save_pretrained(tmp_path / "merged", save_adapters_separately=False)
    flow.model.merge()
    assert {k: (v.qtype.name, v.block_size) for k, v in flow.model.encodings().items()} == before
    graphlora.export_onnx(flow.model, tmp_path / "m.onnx", (data[0][0],), lora="branch")
    model = onnx.load(tmp_path / "m.onnx")
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["DequantizeLinear"] == 3
    int4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 3
