"""ONNX export: parity with graphlora's PyTorch model, and the graph onnxruntime actually runs.

Parity references: the LoraModel itself for float / branch / inputs exports, and for merged
exports of a quantized base the prepared (merged, re-quantized) graph — the PyTorch model of
exactly what was exported. "Accelerated" is read from onnxruntime's optimised graph.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from test_onnx_fixtures import (
    INT8_BOUND,
    quantize_activations,
    quantize_lora_weights,
    quantize_weights,
    randomize_lora,
    rel_err,
)
from toy_models import MLP, AllSpellings, ids, tiny_bert

import graphlora
from graphlora.errors import ExportError, GraphloraWarning, PassError
from graphlora.onnx import (
    InferenceSession,
    export_onnx,
    float_fallbacks,
    op_counts,
    optimized_model,
    quantized_kernels,
)
from graphlora.onnx.prepare import prepare

# Per-qtype parity bounds (max |ort - torch| / max |torch|) at accuracy_level 0. Both sides
# dequantize the same codes; what remains is float summation order (and, for MatMulNBits /
# MatMulIntegerToFloat, integer-domain accumulation), measured ~1e-7..3e-7 on these models;
# int8 is looser on CPUs whose onnxruntime int8 kernels saturate (test_onnx_fixtures.INT8_BOUND).
BOUNDS = {"float": 1e-4, "int4": 1e-4, "uint4": 1e-4, "int8": INT8_BOUND, "nf4": 1e-4, "fp8": 1e-4}


def _bert_inputs(batch=2, seq=8, seed=0):
    x = ids(batch, seq, seed=seed)
    mask = torch.ones_like(x)
    if batch > 1:
        mask[-1, seq // 2:] = 0
    return {"input_ids": x, "attention_mask": mask}


def _run(path, feeds, **kw):
    sess = InferenceSession(path, "cpu", accuracy_level=0, **kw)
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})


@pytest.fixture(scope="module")
def bert_lora():
    model = tiny_bert()
    lm = graphlora.transform(model, graphlora.LoraRule(".*(query|value|dense)", rank=4), (),
                             _bert_inputs())
    return randomize_lora(lm)


# ----------------------------------------------------------------------------- float
@pytest.mark.parametrize("mode", ["merged", "branch", "inputs"])
def test_float_export_matches_torch_on_new_batch_and_sequence(bert_lora, tmp_path, mode):
    path = tmp_path / "m.onnx"
    result = export_onnx(bert_lora, path, (), _bert_inputs(), lora=mode)
    model = onnx.load(path)
    assert model.ir_version == 10
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    onnx.checker.check_model(model, full_check=True)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert result.outputs == ["last_hidden_state", "pooler_output"]
    feeds = _bert_inputs(batch=3, seq=13, seed=5)  # neither the traced batch nor length
    got = _run(path, feeds)
    ref = bert_lora(**feeds)
    assert rel_err(got[0], ref[0].detach()) < BOUNDS["float"]
    assert rel_err(got[1], ref[1].detach()) < BOUNDS["float"]


def test_merged_float_export_has_no_lora_nodes(bert_lora, tmp_path):
    export_onnx(bert_lora, tmp_path / "m.onnx", (), _bert_inputs(), lora="merged")
    names = [i.name for i in onnx.load(tmp_path / "m.onnx").graph.initializer]
    assert not any("lora_" in n or "graphlora" in n for n in names)


# ----------------------------------------------------------------------------- int4 / MatMulNBits
def _mlp_int4(example_shape):
    torch.manual_seed(0)
    lm = graphlora.transform(MLP((64, 64, 64, 8)).eval(), graphlora.LoraRule(".*", rank=4),
                             (torch.randn(*example_shape),))
    randomize_lora(lm)
    return quantize_weights(lm, "int4", 32)


@pytest.fixture(scope="module")
def mlp_int4():
    return _mlp_int4((4, 64))


@pytest.fixture(scope="module")
def mlp_int4_3d():
    return _mlp_int4((2, 3, 64))


@pytest.mark.parametrize("mode", ["branch", "merged", "inputs"])
@pytest.mark.parametrize("batch_shape", [(6,), (3, 5)], ids=["2d", "3d"])
def test_int4_blocked_becomes_matmulnbits_with_bias_and_branch(mlp_int4, mlp_int4_3d, tmp_path, mode,
                                                               batch_shape):
    """Linear with bias (DQ -> MatMul -> Add) and the LoRA Add: still MatMulNBits, on 2-D (the
    MatMulAddFusion case) and 3-D activations."""
    if len(batch_shape) == 2:
        mlp_int4 = mlp_int4_3d
    example = torch.randn(*[2] * len(batch_shape), 64)
    path = tmp_path / "m.onnx"
    export_onnx(mlp_int4, path, (example,), lora=mode)
    qdq = onnx.load(path)
    dq = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"]
    inits = {i.name: i for i in qdq.graph.initializer}
    assert len(dq) == 3
    for node in dq:  # pre-quantized INT4 (K, N) blocked along K: what DQMatMulToMatMulNBits fuses
        w = inits[node.input[0]]
        assert w.data_type == onnx.TensorProto.INT4
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs == {"axis": 0, "block_size": 32}
        assert inits[node.input[1]].dims[0] == -(-w.dims[0] // 32)
    float_base = [i.name for i in qdq.graph.initializer  # no float copy of a base weight
                  if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
                  and "lora" not in i.name and ".scale" not in i.name]
    assert float_base == []
    opt = optimized_model(path)
    assert quantized_kernels(opt)["MatMulNBits"] == 3
    assert float_fallbacks(opt) == []
    x = torch.randn(*batch_shape, 64)
    got = _run(path, {"x": x})[0]
    ref = prepare(mlp_int4.graph_module, mode).graph_module(x)
    assert rel_err(got, ref.detach()) < BOUNDS["int4"]
    if mode != "merged":
        assert rel_err(got, mlp_int4(x).detach()) < BOUNDS["int4"]


def test_matmul_add_fusion_is_the_blocker_the_session_avoids(mlp_int4, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(mlp_int4, path, (torch.randn(4, 64),), lora="merged")
    assert float_fallbacks(optimized_model(path)) == []
    stock = optimized_model(path, disable_matmul_add_fusion=False)
    if not float_fallbacks(stock):
        pytest.skip("this onnxruntime no longer turns DQ->MatMul->Add into a float Gemm")
    assert quantized_kernels(stock)["MatMulNBits"] < 3


def test_uint4_asymmetric_and_spellings(tmp_path):
    """Every linear spelling (linear, F.linear, x @ W.T, Conv1D addmm (in, out), matmul) with
    asymmetric uint4 (zero points) and odd input widths."""
    torch.manual_seed(0)
    lm = graphlora.transform(AllSpellings().eval(), graphlora.LoraRule(".*", rank=2),
                             (torch.randn(3, 8),))
    randomize_lora(lm)
    quantize_weights(lm, "uint4", 16, method="minmax")
    for mode in ("branch", "merged"):
        path = tmp_path / f"{mode}.onnx"
        export_onnx(lm, path, (torch.randn(3, 8),), lora=mode)
        x = torch.randn(5, 8)
        got = _run(path, {"x": x})[0]
        ref = prepare(lm.graph_module, mode).graph_module(x)
        assert rel_err(got, ref.detach()) < BOUNDS["uint4"]


# ----------------------------------------------------------------------------- int8 full QDQ
@pytest.fixture(scope="module")
def bert_int8(tmp_path_factory):
    """Real pipeline: transform with int8 weights + uint8 activations + quantized LoRA, calibrate."""
    rule = graphlora.LoraRule(".*(query|value|dense)", rank=4, weight_qtype="int8",
                              act_qtype="uint8", lora_weight_qtype="int8", lora_act_qtype="uint8")
    lm = graphlora.transform(tiny_bert(), [rule], (), _bert_inputs())
    randomize_lora(lm)
    graphlora.calibrate(lm, [_bert_inputs(seed=i) for i in range(3)], progress=False)
    path = tmp_path_factory.mktemp("int8") / "branch.onnx"
    export_onnx(lm, path, (), _bert_inputs(), lora="branch")
    return lm, path


def test_int8_qdq_becomes_integer_matmuls(bert_int8):
    lm, path = bert_int8
    model = onnx.load(path)
    inits = {i.name: i for i in model.graph.initializer}
    weights = [inits[n.input[0]] for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weights and all(w.data_type == onnx.TensorProto.INT8 for w in weights)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) >= 11
    opt = optimized_model(path)
    kernels = quantized_kernels(opt)
    assert kernels["QLinearMatMul"] + kernels["MatMulIntegerToFloat"] >= 11 * 3  # base, A, B
    assert float_fallbacks(opt) == []
    feeds = _bert_inputs(batch=3, seq=11, seed=7)
    got = _run(path, feeds)
    ref = lm(**feeds)
    assert rel_err(got[0], ref[0].detach()) < BOUNDS["int8"]


def test_int8_merged_reuses_activation_encodings(bert_int8, tmp_path):
    lm, _ = bert_int8
    path = tmp_path / "merged.onnx"
    result = export_onnx(lm, path, (), _bert_inputs(), lora="merged")
    assert result.quantized_activations == 9  # query and value share their input encoding
    opt = optimized_model(path)
    assert quantized_kernels(opt)["MatMulIntegerToFloat"] == 11 and float_fallbacks(opt) == []
    feeds = _bert_inputs(batch=2, seq=9, seed=3)
    got = _run(path, feeds)
    ref = prepare(lm.graph_module, "merged").graph_module(**feeds)
    assert rel_err(got[0], ref[0].detach()) < BOUNDS["int8"]


# ----------------------------------------------------------------------------- nf4 / fp8 / w4a8
def test_nf4_lowers_to_matmulbnb4(tmp_path):
    rule = graphlora.LoraRule(".*(query|value|dense)", rank=4, weight_qtype="nf4", group_size=32,
                              double_quant=True)
    lm = randomize_lora(graphlora.transform(tiny_bert(), [rule], (), _bert_inputs()))
    path = tmp_path / "nf4.onnx"
    result = export_onnx(lm, path, (), _bert_inputs(), lora="branch")
    assert result.contrib_ops == ["MatMulBnb4"]
    model = onnx.load(path)
    assert {o.domain for o in model.opset_import} >= {"", "com.microsoft"}
    assert op_counts(model)["MatMulBnb4"] == 11
    feeds = _bert_inputs(batch=2, seq=10, seed=4)
    got = _run(path, feeds)
    assert rel_err(got[0], lm(**feeds)[0].detach()) < BOUNDS["nf4"]


class _Nf4Shapes(torch.nn.Module):
    """One linear per NF4 layout MatMulBnb4 has no direct block for: a row shorter than 16
    (padded), a group that does not divide the row (shorter last group), groups of 512 (blocks of
    256 sharing an absmax), per-channel over a long row, and double quantization over a ragged row."""

    def __init__(self):
        super().__init__()
        dims = (12, 100, 1024, 48, 40, 8)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


NF4_SHAPE_RULES = [  # layers.i: (in_features, group_size)
    graphlora.LoraRule(r"layers\.0", rank=2, weight_qtype="nf4"),                          # 12, per row
    graphlora.LoraRule(r"layers\.1", rank=2, weight_qtype="nf4", group_size=64),           # 100, 64 + 36
    graphlora.LoraRule(r"layers\.2", rank=2, weight_qtype="nf4", group_size=512),          # 1024, 2 x 512
    graphlora.LoraRule(r"layers\.3", rank=2, weight_qtype="nf4", group_size=32, double_quant=True),  # 48
    graphlora.QuantRule(r"layers\.4", weight_qtype="nf4", group_size=16),                  # 40, 16+16+8
]


@pytest.mark.slow
def test_nf4_layouts_without_a_direct_matmulbnb4_block_export_exactly(tmp_path):
    """Every NF4 encoding transform accepts exports: re-blocked (absmax repeated) and padded
    (codes of 0.0, zeros appended to the activation) into MatMulBnb4, computing what torch does."""
    torch.manual_seed(0)
    lm = randomize_lora(graphlora.transform(_Nf4Shapes().eval(), NF4_SHAPE_RULES, (torch.randn(2, 12),)))
    x = torch.randn(5, 12)
    for mode in ("branch", "merged"):
        path = tmp_path / f"{mode}.onnx"
        export_onnx(lm, path, (torch.randn(2, 12),), lora=mode)
        model = onnx.load(path)
        bnb4 = {n.name.split("/")[0]: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                for n in model.graph.node if n.op_type == "MatMulBnb4"}
        assert [(bnb4[f"layers.{i}.weight"]["K"], bnb4[f"layers.{i}.weight"]["block_size"])
                for i in range(5)] == [(16, 16), (112, 16), (1024, 256), (48, 16), (48, 16)]
        assert op_counts(model)["Pad"] == 3  # the three rows no block divides
        got = _run(path, {"x": x})[0]
        with torch.no_grad():
            ref = lm(x) if mode == "branch" else prepare(lm.graph_module, "merged").graph_module(x)
        assert rel_err(got, ref) < BOUNDS["nf4"], mode


@pytest.mark.slow
def test_fp16_model_with_float32_lora_factors_exports_and_runs(tmp_path):
    """float16 base, float32 LoRA factors (autocast_adapter_dtype), an NF4 layer: the branch
    export keeps the factors float32 behind Casts, MatMulBnb4 reads float32 between Casts, and
    onnxruntime computes what torch does."""
    torch.manual_seed(0)
    model = MLP((32, 64, 8)).eval().to(torch.float16)
    x = torch.randn(2, 32, dtype=torch.float16)
    rules = [graphlora.LoraRule(r"layers\.0", rank=4, weight_qtype="nf4", group_size=32),
             graphlora.LoraRule(r"layers\.1", rank=4)]
    lm = randomize_lora(graphlora.transform(model, rules, (x,)))
    assert {p.dtype for p in lm.lora_parameters()} == {torch.float32}
    path = tmp_path / "m.onnx"
    result = export_onnx(lm, path, (x,), lora="branch")
    assert result.contrib_ops == ["MatMulBnb4"]
    exported = onnx.load(path)
    lora = [i for i in exported.graph.initializer if "lora_A" in i.name or "lora_B" in i.name]
    assert len(lora) == 4 and {i.data_type for i in lora} == {onnx.TensorProto.FLOAT}
    assert op_counts(exported)["Cast"] >= 6  # each branch in and out, MatMulBnb4 in and out
    x2 = torch.randn(5, 32, dtype=torch.float16)
    got = _run(path, {"x": x2})[0]
    assert got.dtype == np.float16
    with torch.no_grad():
        assert rel_err(got, lm(x2).float()) < 5e-3  # float16 rounding, both sides


def test_nf4_group_size_without_onnx_form_is_refused_at_transform():
    """A group shorter than the row and not a multiple of 16 has no MatMulBnb4 form: transform
    says so (rule and site) instead of training a model the export then refuses. A group of
    the same size covering a whole row is fine."""
    model = MLP(dims=(8, 24, 4)).eval()
    rule = graphlora.LoraRule(".*", rank=2, weight_qtype="nf4", group_size=12)
    with pytest.raises(graphlora.RuleError, match=r"rule #0 .*site 'layers\.1'.*group_size 12 over 24"):
        graphlora.transform(model, [rule], (torch.randn(2, 8),))
    lm = graphlora.transform(model, [graphlora.LoraRule("layers.0", rank=2, weight_qtype="nf4", group_size=12)],
                             (torch.randn(2, 8),))
    assert [s.weight_qtype for s in lm.sites] == ["nf4"]


def test_nf4_weight_read_in_both_orientations_is_refused_at_transform():
    """``(x @ w.T) @ w``: the second use reads the NF4 blocks along its output features, which
    MatMulBnb4 cannot; transform names the use. int4 (QDQ) quantizes the same weight fine."""

    class BothWays(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(32, 32) * 0.1)

        def forward(self, x):
            return (x @ self.w.T) @ self.w

    x = torch.randn(2, 32)
    with pytest.raises(graphlora.RuleError, match=r"site 'w#1' reads its weight transposed.*int4"):
        graphlora.transform(BothWays(), [graphlora.QuantRule(".*", weight_qtype="nf4", group_size=16)], (x,))
    lm = graphlora.transform(BothWays(), [graphlora.QuantRule(".*", weight_qtype="int4", group_size=16)], (x,))
    assert [s.weight_qtype for s in lm.sites] == ["int4", "int4"]


def test_fp8_weights_are_stored_as_float8(tmp_path):
    torch.manual_seed(0)
    lm = graphlora.transform(MLP((16, 32, 8)).eval(), graphlora.LoraRule(".*", rank=2),
                             (torch.randn(2, 16),))
    quantize_weights(randomize_lora(lm), "fp8_e4m3")
    path = tmp_path / "fp8.onnx"
    export_onnx(lm, path, (torch.randn(2, 16),), lora="branch")
    types = {i.data_type for i in onnx.load(path).graph.initializer}
    assert onnx.TensorProto.FLOAT8E4M3FN in types
    x = torch.randn(4, 16)
    assert rel_err(_run(path, {"x": x})[0], lm(x).detach()) < BOUNDS["fp8"]


def test_int4_weights_with_quantized_activations_warn_unfused(tmp_path):
    torch.manual_seed(0)
    lm = graphlora.transform(MLP((64, 64, 8)).eval(), graphlora.LoraRule(".*", rank=2),
                             (torch.randn(2, 3, 64),))
    quantize_weights(lm, "int4", 32)
    quantize_activations(lm, "uint8", [(torch.randn(2, 3, 64),)])
    with pytest.warns(GraphloraWarning, match="W4A8"):
        result = export_onnx(lm, tmp_path / "m.onnx", (torch.randn(2, 3, 64),), lora="branch")
    assert len(result.unfused) == 2
    x = torch.randn(2, 5, 64)
    assert rel_err(_run(tmp_path / "m.onnx", {"x": x})[0], lm(x).detach()) < BOUNDS["int4"]


def test_quantized_lora_weights_in_branch_are_integer_initializers(tmp_path):
    torch.manual_seed(0)
    lm = graphlora.transform(MLP((32, 32, 8)).eval(), graphlora.LoraRule(".*", rank=4),
                             (torch.randn(2, 32),))
    quantize_lora_weights(quantize_weights(randomize_lora(lm), "int8"))
    path = tmp_path / "m.onnx"
    export_onnx(lm, path, (torch.randn(2, 32),), lora="branch")
    model = onnx.load(path)
    float_inits = [i.name for i in model.graph.initializer
                   if i.data_type == onnx.TensorProto.FLOAT and "lora" in i.name and len(i.dims) == 2]
    assert float_inits == []
    x = torch.randn(3, 32)
    assert rel_err(_run(path, {"x": x})[0], lm(x).detach()) < BOUNDS["int8"]


# ----------------------------------------------------------------------------- QW-LoRA grid base
def test_grid_base_is_quantized_with_its_own_encoding(tmp_path):
    """A float base on the grid ("weight_encoding") is stored with exactly that encoding, in
    both modes; merged adds the delta before quantizing with the same encoding."""
    torch.manual_seed(0)
    lm = graphlora.transform(MLP((64, 64, 8)).eval(), graphlora.LoraRule(".*", rank=4),
                             (torch.randn(2, 64),))
    quantize_weights(randomize_lora(lm, std=0.01), "int4", 32, storage="float")
    enc = {s.spec.weight_name: s.node.meta["graphlora"]["weight_encoding"]
           for s in graphlora.sites.tagged_sites(lm.graph_module)}
    path = tmp_path / "branch.onnx"
    export_onnx(lm, path, (torch.randn(2, 64),), lora="branch")
    model = onnx.load(path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    scale = inits["layers.0.weight.scale_t"]
    np.testing.assert_array_equal(scale.T, enc["layers.0.weight"].scale.float().numpy())
    x = torch.randn(3, 64)
    assert rel_err(_run(path, {"x": x})[0], lm(x).detach()) < BOUNDS["int4"]
    merged = tmp_path / "merged.onnx"
    export_onnx(lm, merged, (torch.randn(2, 64),), lora="merged")
    minits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(merged).graph.initializer}
    np.testing.assert_array_equal(minits["layers.0.weight.scale_t"], scale)  # reused, not recomputed
    ref = prepare(lm.graph_module, "merged").graph_module(x)
    assert rel_err(_run(merged, {"x": x})[0], ref.detach()) < BOUNDS["int4"]


# ----------------------------------------------------------------------------- errors and files
def test_bad_requests_raise_export_error_and_write_nothing(mlp_int4, tmp_path):
    path = tmp_path / "m.onnx"
    x = torch.randn(2, 64)
    with pytest.raises(ExportError, match="opset 20 cannot express .*layers.0.weight.*opset >= 21"):
        export_onnx(mlp_int4, path, (x,), opset=20)
    with pytest.raises(ExportError, match="unknown lora mode 'fused'"):
        export_onnx(mlp_int4, path, (x,), lora="fused")
    with pytest.raises(ExportError, match="example inputs"):
        export_onnx(mlp_int4, path)
    with pytest.raises(ExportError, match="LoraModel"):
        export_onnx(torch.nn.Linear(2, 2), path, (torch.randn(1, 2),))
    assert list(tmp_path.iterdir()) == []


def test_inputs_mode_refuses_quantized_lora(tmp_path):
    torch.manual_seed(0)
    lm = graphlora.transform(MLP((16, 16, 4)).eval(), graphlora.LoraRule(".*", rank=2),
                             (torch.randn(2, 16),))
    quantize_lora_weights(lm)
    with pytest.raises(ExportError, match="lora='inputs' cannot export the quantized LoRA branch"):
        export_onnx(lm, tmp_path / "m.onnx", (torch.randn(2, 16),), lora="inputs")
    assert not (tmp_path / "m.onnx").exists()


def test_failed_check_leaves_previous_file(mlp_int4, tmp_path, monkeypatch):
    import graphlora.onnx.export as export_module

    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")

    def broken(_):
        raise ExportError("injected")

    monkeypatch.setattr(export_module, "_check", broken)
    with pytest.raises(ExportError, match="injected"):
        export_onnx(mlp_int4, path, (torch.randn(2, 64),))
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_external_data(mlp_int4, tmp_path, monkeypatch):
    import graphlora.onnx.export as export_module

    path = tmp_path / "m.onnx"
    first = export_onnx(mlp_int4, path, (torch.randn(2, 64),), external_data=True)
    assert first.external_data is not None and first.external_data.exists()
    monkeypatch.setattr(export_module, "TWO_GB", 4096)  # "over 2 GB": external data by itself
    monkeypatch.setattr(export_module, "_EXTERNAL_MARGIN", 0)
    second = export_onnx(mlp_int4, path, (torch.randn(2, 64),))
    assert second.external_data is not None and second.external_data.exists()
    assert not first.external_data.exists()  # the previous data file went with its model
    onnx.checker.check_model(str(path), full_check=True)
    x = torch.randn(3, 64)
    ref = prepare(mlp_int4.graph_module, "merged").graph_module(x)
    assert rel_err(_run(path, {"x": x})[0], ref.detach()) < BOUNDS["int4"]


# ----------------------------------------------------------------------------- preparation passes
def test_export_steps_are_recorded_diffable_passes(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 16)
    rule = graphlora.LoraRule(".*", rank=2, weight_qtype="int8")
    lm = randomize_lora(graphlora.transform(MLP((16, 16, 4)).eval(), rule, (x,), record=True))
    merged = export_onnx(lm, tmp_path / "m.onnx", (x,), lora="merged")
    assert [(r.name, r.modified) for r in merged.pass_log] == [
        ("MergeLoraForExportPass", True), ("StoreGridWeightsPass", False), ("PruneUnusedPass", True)]
    fold = merged.pass_log[0].diff
    assert set(fold.by_module_path()) == {"layers.0", "layers.1"}
    assert "lora_add" in fold.summary and not fold.summary.startswith("+1")
    inputs = export_onnx(lm, tmp_path / "i.onnx", (x,), lora="inputs")
    assert [r.name for r in inputs.pass_log] == ["StoreGridWeightsPass", "LoraAsInputsPass",
                                                 "PruneUnusedPass"]
    assert "graphlora_lora_inputs" in str(inputs.pass_log[1].diff)
    plain = graphlora.transform(MLP((16, 16, 4)).eval(), rule, (x,))  # not recorded: no texts
    record = export_onnx(plain, tmp_path / "p.onnx", (x,), lora="branch").pass_log[0]
    assert record.before is None and record.seconds >= 0
    with pytest.raises(PassError, match="record=True"):
        record.diff


def test_export_requires_calibrated_observers(tmp_path):
    from graphlora.passes.observers import InsertObserversPass

    torch.manual_seed(0)
    x = torch.randn(2, 16)
    lm = graphlora.transform(MLP((16, 16, 4)).eval(), graphlora.LoraRule(".*", rank=2, act_qtype="uint8"), (x,))
    lm.run_passes([InsertObserversPass()])
    for mode in ("merged", "branch", "inputs"):
        with pytest.raises(ExportError, match="2 activation observer.*graphlora.calibrate"):
            export_onnx(lm, tmp_path / "m.onnx", (x,), lora=mode)
    assert list(tmp_path.iterdir()) == []
