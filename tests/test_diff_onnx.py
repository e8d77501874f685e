"""graph_text / diff of ONNX models: dynamo exports and hand-built onnx.helper graphs."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from graphlora.diff import diff, graph_text, read_graph_text


class LoraLinear(nn.Module):
    """A Linear with a LoRA branch written out as modules, as an exported LoRA model would have."""

    def __init__(self, n_in: int, n_out: int, rank: int):
        super().__init__()
        self.base = nn.Linear(n_in, n_out)
        self.lora_A = nn.Linear(n_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, n_out, bias=False)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * 2.0


class MLP(nn.Module):
    def __init__(self, lora_rank: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(16, 4) if lora_rank is None else LoraLinear(16, 4, lora_rank)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _export(model: nn.Module) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(), (torch.randn(2, 8),), dynamo=True, dynamic_shapes=({0: batch},), verbose=False
        )
    return program.model_proto


@pytest.fixture(scope="module")
def exports() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    return _export(MLP()), _export(MLP(lora_rank=2))


def test_graph_text_of_a_dynamo_export(exports):
    text = graph_text(exports[0])
    lines = text.splitlines()
    assert lines[0] == "# graphlora graph_text v1 onnx"
    assert lines[1].startswith("opset = ai.onnx:")
    assert "x = input :: f32[batch,8]" in lines
    assert "fc1/weight = initializer fc1.weight :: f32[16,8]" in lines
    gemm = next(line for line in lines if line.startswith("fc1/"))
    assert any(line.startswith("act/Gelu#0 = Gelu[approximate='none'](%fc1/") for line in lines), text
    assert gemm  # module paths come from the exporter's name scopes
    assert lines[-1].startswith("output = output(%fc2/")
    # exporter value names (linear_1, val_12) are replaced by producer ids
    assert "linear" not in text.replace("aten.linear", "") and "val_" not in text


def test_onnx_diff_of_two_exports_is_local_to_the_changed_module(exports):
    before, after = exports
    d = diff(before, after)
    assert d
    paths = list(d.by_module_path())
    assert paths and all(p == "fc2" or p.startswith("fc2.") for p in paths), paths
    assert {"fc2.lora_A", "fc2.lora_B"} <= set(paths)
    assert not any(c.module_path.startswith(("fc1", "act")) for c in d.added + d.removed + d.changed)
    assert "+++ after" in str(d)


def test_onnx_text_is_stable_across_exports_and_files(exports, tmp_path):
    again = _export(MLP())
    assert graph_text(again) == graph_text(exports[0])
    path = tmp_path / "mlp.onnx"
    onnx.save(exports[0], path)
    assert read_graph_text(path) == graph_text(exports[0]) == graph_text(str(path))
    assert not diff(path, exports[0])


def _matmul_model(quantized: bool, block_size: int = 32, names: str = "torchscript") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 16])
    prefix = "/fc/" if names == "torchscript" else ""
    if quantized:
        inits = [
            helper.make_tensor("fc.weight_q", TensorProto.INT4, [64, 16], [0] * (64 * 16)),
            helper.make_tensor(
                "fc.weight_scale", TensorProto.FLOAT, [64 // block_size, 16], [1.0] * (64 // block_size * 16)
            ),
        ]
        nodes = [
            helper.make_node(
                "DequantizeLinear",
                ["fc.weight_q", "fc.weight_scale"],
                ["w"],
                name=f"{prefix}DequantizeLinear",
                axis=0,
                block_size=block_size,
            ),
            helper.make_node("MatMul", ["X", "w"], ["Y"], name=f"{prefix}MatMul"),
        ]
    else:
        inits = [helper.make_tensor("fc.weight", TensorProto.FLOAT, [64, 16], [0.0] * (64 * 16))]
        nodes = [helper.make_node("MatMul", ["X", "fc.weight"], ["Y"], name=f"{prefix}MatMul")]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_hand_built_models_and_qdq_attributes():
    text = graph_text(_matmul_model(quantized=True))
    assert "fc/weight_q = initializer fc.weight_q :: i4[64,16]" in text
    assert (
        "fc/DequantizeLinear#0 = DequantizeLinear[axis=0, block_size=32](%fc/weight_q, %fc/weight_scale)"
        " :: f32[64,16]  # role=dequant axis=0 block_size=32 qtype=int4 tensor=fc.weight_q"
    ) in text
    assert "fc/MatMul#0 = MatMul(%X, %fc/DequantizeLinear#0) :: f32[batch,16]" in text  # inferred
    assert "output = output(Y=%fc/MatMul#0)" in text

    d = diff(_matmul_model(quantized=False), _matmul_model(quantized=True))
    assert list(d.by_module_path()) == ["fc"]
    assert d.grouped() == ["fc: -weight; weight_q float32 -> int4[g32]; 1 user rewired"]
    assert str(diff(_matmul_model(True, 32), _matmul_model(True, 16))).count("block_size=16") >= 1


def test_hand_built_model_without_scopes_is_at_the_root():
    text = graph_text(_matmul_model(quantized=False, names="plain"))
    assert "MatMul#0 = MatMul(%X, %fc/weight)" in text
