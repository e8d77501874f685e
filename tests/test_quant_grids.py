"""Symmetric integer grids: full (AIMET's, every code) and restricted (mirror-symmetric), named in
rules, carried by encodings and files, exported to ONNX with the codes graphlora computed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import graphlora
from graphlora.errors import GraphloraWarning, QuantizationError, RuleError
from graphlora.onnx import export_onnx
from graphlora.quant import (
    DEFAULT_GRIDS,
    Encoding,
    calibrate_weight,
    get_qtype,
    make_observer,
    resolve_grid,
    with_grid,
)
from graphlora.rules_file import dump_rules, parse_rules


def test_restricted_qtype_drops_the_most_negative_code():
    for name in ("int4", "int8", "int16"):
        q = with_grid(name, "restricted")
        full = get_qtype(name)
        assert (q.name, q.grid, q.qmin, q.qmax) == (name, "restricted", full.qmin + 1, full.qmax)
        assert q.full is full and with_grid(q, "full") is full
    u = with_grid("uint4", "restricted")
    assert (u.qmin, u.qmax) == (1, 15)  # symmetric about the zero point 8: 8 +- 7
    with pytest.raises(QuantizationError, match="nf4"):
        with_grid("nf4", "restricted")
    with pytest.raises(QuantizationError, match="unknown grid"):
        with_grid("int8", "half")


def test_resolve_grid_defaults_by_name_keeps_an_objects_grid():
    assert resolve_grid("int4", None, True).grid == DEFAULT_GRIDS["int4"]
    restricted = with_grid("int8", "restricted")
    assert resolve_grid(restricted, None, True) is restricted  # an encoding's qtype stays exact
    assert resolve_grid(get_qtype("int8"), None, True).grid == "full"
    assert resolve_grid("int8", None, False).grid == "full"  # asymmetric: always the full range
    with pytest.raises(QuantizationError, match="asymmetric"):
        resolve_grid("int8", "restricted", False)


@pytest.mark.parametrize("qname", ["int4", "uint4", "int8"])
def test_restricted_codes_never_use_the_dropped_code(qname):
    torch.manual_seed(0)
    w = torch.randn(16, 64) ** 3
    for method in ("absmax", "mse"):
        enc = calibrate_weight(w, qname, method=method, block_size=16, symmetric=True, grid="restricted")
        codes = enc.quantize(w)
        full = get_qtype(qname)
        assert int(codes.min()) >= full.qmin + 1, method
        # a far-out value clamps to the restricted end, not the type's
        far = torch.full_like(w, -1e6)
        assert int(enc.quantize(far).min()) == full.qmin + 1


def test_full_grid_error_no_worse_than_restricted_on_skewed_weights():
    torch.manual_seed(0)
    w = torch.randn(64, 256) - 0.3  # minimum dominates: the extra code pays
    err = {}
    for grid in ("full", "restricted"):
        enc = calibrate_weight(w, "int4", block_size=32, grid=grid)
        err[grid] = float((enc.dequantize(enc.quantize(w)) - w).pow(2).sum())
    assert err["full"] < err["restricted"]


def test_encoding_validation_and_file_round_trip(tmp_path):
    enc = calibrate_weight(torch.randn(8, 32), "int4", block_size=16, grid="restricted", name="w")
    with pytest.raises(QuantizationError, match="restricted grid is symmetric"):
        Encoding(with_grid("uint8", "restricted"), torch.tensor(0.1), torch.tensor(3, dtype=torch.int32),
                 symmetric=False)
    d = enc.to_dict()
    assert d["graphlora"]["grid"] == "restricted"
    assert d["offset"][0] == -8  # AIMET's offset is relative to the type's full unsigned range
    back = Encoding.from_dict(d)
    assert back.grid == "restricted" and back.qtype == enc.qtype
    x = torch.randn(8, 32) * 3
    assert torch.equal(back.quantize(x), enc.quantize(x))
    path = tmp_path / "enc.json"
    graphlora.save_encodings({"w": enc}, path)
    assert graphlora.load_encodings(path)["w"].grid == "restricted"


def test_observer_grids():
    obs = make_observer("minmax")
    obs(torch.tensor([-2.0, 0.5, 1.0]))
    full = obs.compute_encoding("int8", symmetric=True, grid="full")
    restricted = obs.compute_encoding("int8", symmetric=True, grid="restricted")
    assert full.scale.item() == pytest.approx(2.0 / 128)  # max(|min| / 128, max / 127)
    assert restricted.scale.item() == pytest.approx(2.0 / 127)
    assert restricted.qtype.qmin == -127


def test_rules_validate_and_files_round_trip_grids():
    rule = graphlora.LoraRule("x", rank=2, weight_qtype="int4", weight_grid="restricted",
                              act_qtype="int8", act_symmetric=True, act_grid="full")
    graphlora.transform(nn.Sequential(nn.Linear(4, 4)), [graphlora.QuantRule("0", weight_qtype="int4",
                                                                              weight_grid="full")],
                        (torch.randn(2, 4),), progress=False)
    (back,) = parse_rules(dump_rules([rule]))
    assert back == rule
    bad = [
        (dict(weight_qtype="int4", weight_grid="half"), "weight_grid must be one of"),
        (dict(weight_qtype="nf4", weight_grid="restricted"), "integer weight qtype"),
        (dict(weight_qtype="int4", weight_calibration="minmax", weight_grid="restricted"), "asymmetric"),
        (dict(act_qtype="int8", act_grid="restricted"), "act_symmetric=True"),
    ]
    for fields, message in bad:
        with pytest.raises(RuleError, match=message):
            graphlora.transform(nn.Sequential(nn.Linear(4, 4)), [graphlora.QuantRule("0", **fields)],
                                (torch.randn(2, 4),), progress=False)


@pytest.mark.parametrize("grid", ["full", "restricted"])
def test_onnx_export_of_both_grids_runs_with_graphlora_codes(grid, tmp_path):
    """int4 blocked weights and symmetric int8 activations on ``grid``: the initializers are the
    encoding's codes, and onnxruntime (all optimisations on) reproduces graphlora's outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    with torch.no_grad():
        model[0].weight -= 0.05  # skewed: the full grid's extra code is used
    rules = [graphlora.QuantRule(r"\d", weight_qtype="int4", group_size=16, weight_grid=grid,
                                 act_qtype="int8", act_symmetric=True, act_grid=grid)]
    x = torch.randn(8, 32)
    lm = graphlora.transform(model, rules, (x,), progress=False)
    graphlora.calibrate(lm, [(torch.randn(8, 32),) for _ in range(3)], progress=False)
    encodings = lm.encodings()
    assert {e.grid for e in encodings.values()} == {grid}
    path = tmp_path / "m.onnx"
    with pytest.warns(GraphloraWarning, match="W4A8"):  # 4-bit weights + int8 activations: float MatMul
        export_onnx(lm, path, (x,), lora="merged")
    proto = onnx.load(path)
    inits = {i.name: i for i in proto.graph.initializer}
    for name in ("0.weight", "2.weight"):
        enc = encodings[name]
        codes = enc.quantize(model.get_submodule(name[0]).weight.detach())
        (stored,) = [v for k, v in inits.items() if k.endswith(f"{name}.quantized_t") or k.endswith(f"{name}.quantized")]
        got = numpy_helper.to_array(stored).astype(np.int8)
        assert np.array_equal(got, codes.T.numpy())
        if grid == "restricted":
            assert got.min() >= -7
    clips = [n for n in proto.graph.node if n.op_type == "Clip"]
    assert len(clips) == (2 if grid == "restricted" else 0)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = torch.randn(8, 32) * 4  # beyond the calibrated range: saturation is exercised
    (ours,) = [lm(probe).detach().numpy()]
    (theirs,) = sess.run(None, {sess.get_inputs()[0].name: probe.numpy()})
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
