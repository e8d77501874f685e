"""The ONNX file holds graphlora's bytes: every quantized initializer export writes is
byte-identical to what :mod:`graphlora.quant` computes for that tensor.

Expected values come from the quant API only — the model's encodings, ``Encoding.quantize`` of the
original weight, :func:`pack_4bit` — and the documented re-layout: a weight a MatMul reads is
stored ``(K, N)`` (so an ``nn.Linear`` weight's codes transposed, a ``Conv1D`` weight's as they
are), its per-channel scale ``(N,)``, its block scales ``(n_blocks, N)``, a per-tensor scale one
element; 4-bit tensors are packed
over the flattened tensor, low nibble first; NF4 goes to ``MatMulBnb4`` in bitsandbytes' order
(first code in the high nibble) with a float32 absmax. One export per model covers every case.
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from toy_models import Conv1D

import graphlora
from graphlora.onnx import export_onnx
from graphlora.passes.quantize_weights import QuantizeWeightsPass
from graphlora.quant import Encoding, calibrate_weight, pack_4bit

WIDTH = 64

# layer -> the rule fields quantizing its weight (graphlora's weight qtypes x granularities)
RULE_CASES = {
    "int8_channel": dict(weight_qtype="int8"),
    "int8_channel_asym": dict(weight_qtype="int8", weight_calibration="minmax"),
    "uint8_channel": dict(weight_qtype="uint8", weight_symmetric=True),
    "uint8_channel_asym": dict(weight_qtype="uint8", weight_calibration="minmax"),
    "int4_channel": dict(weight_qtype="int4"),
    "int4_block": dict(weight_qtype="int4", group_size=16),
    "int4_block_asym": dict(weight_qtype="int4", group_size=32, weight_calibration="minmax"),
    "uint4_channel_asym": dict(weight_qtype="uint4", weight_calibration="minmax"),
    "uint4_block": dict(weight_qtype="uint4", group_size=16, weight_symmetric=True),
    "uint4_block_asym": dict(weight_qtype="uint4", group_size=16, weight_calibration="minmax"),
    "fp8": dict(weight_qtype="fp8_e4m3"),
    "nf4": dict(weight_qtype="nf4", group_size=64),
    "nf4_dq": dict(weight_qtype="nf4", group_size=32, double_quant=True),
    "conv_int4_block": dict(weight_qtype="int4", group_size=16),
    "conv_uint8_channel_asym": dict(weight_qtype="uint8", weight_calibration="minmax"),
    # odd input width: a short last block, and 4-bit rows that do not end on a byte
    "odd_int8_channel": dict(weight_qtype="int8"),
    "odd_uint4_block_asym": dict(weight_qtype="uint4", group_size=16, weight_calibration="minmax"),
}
# layer -> per-tensor encoding (no rule field asks for one; given to QuantizeWeightsPass)
TENSOR_CASES = {
    "int8_tensor": dict(qtype="int8", method="absmax"),
    "uint8_tensor_asym": dict(qtype="uint8", method="minmax"),
}
ODD = 33


class Stack(nn.Module):
    """One layer per weight case: ``nn.Linear`` (out, in) and transformers ``Conv1D`` (in, out)."""

    def __init__(self):
        super().__init__()
        names = [n for n in [*RULE_CASES, *TENSOR_CASES] if not n.startswith("odd_")]
        self.names = [*names, "odd_int8_channel", "odd_uint4_block_asym"]
        layers = {}
        for name in names:
            layers[name] = Conv1D(WIDTH, WIDTH) if name.startswith("conv_") else nn.Linear(WIDTH, WIDTH)
        layers["odd_int8_channel"] = nn.Linear(WIDTH, ODD)
        layers["odd_uint4_block_asym"] = nn.Linear(ODD, 8)
        self.layers = nn.ModuleDict(layers)

    def forward(self, x):
        for name in self.names:
            x = self.layers[name](x)
            if name != self.names[-1]:
                x = torch.relu(x)
        return x


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def _readers(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if name in n.input]


def _same_bytes(init: onnx.TensorProto, expected: np.ndarray, what: str) -> None:
    got = numpy_helper.to_array(init)
    assert got.dtype == expected.dtype, f"{what}: {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    assert got.tobytes() == expected.tobytes(), f"{what}: bytes differ"


def _codes_numpy(codes: torch.Tensor, qtype: str) -> np.ndarray:
    """Codes in the numpy dtype onnx.numpy_helper gives for the ONNX type of ``qtype``."""
    if qtype == "fp8_e4m3":
        return codes.contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    numpy_type = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "int8": np.int8,
                  "uint8": np.uint8, "int16": np.int16}[qtype]
    return codes.contiguous().numpy().astype(numpy_type)


def _check_dequantized_weight(model: onnx.ModelProto, tensor: str, enc: Encoding,
                              weight: torch.Tensor, *, channel_last: bool) -> None:
    """The DequantizeLinear feeding ``tensor``'s MatMul holds ``enc``'s codes/scale/zero point
    of ``weight``, laid out (K, N)."""
    inits = _initializers(model)
    pattern = re.compile(rf"(^|\.){re.escape(tensor)}\.quantized(_t)?$")
    stored = [name for name in inits if pattern.search(name)]
    assert len(stored) == 1, f"{tensor}: codes initializers {stored}"
    (dq,) = {id(n): n for n in _readers(model, stored[0])}.values()
    assert dq.op_type == "DequantizeLinear"
    assert {n.op_type for n in _readers(model, dq.output[0])} == {"MatMul"}

    codes = enc.quantize(weight)
    kn = codes if channel_last else codes.T  # the (K, N) matrix the MatMul reads
    qtype = enc.qtype.name
    _same_bytes(inits[dq.input[0]], _codes_numpy(kn, qtype), f"{tensor} codes")
    if enc.qtype.packed:  # the file's own bytes: graphlora's packing of the flattened tensor
        assert inits[dq.input[0]].raw_data == pack_4bit(kn.reshape(-1)).numpy().tobytes()

    def kn_param(p: torch.Tensor) -> torch.Tensor:
        if p.dim() == 0:  # per-tensor: stored as a one-element tensor
            return p.reshape(1)
        return p.T if enc.block_size is not None else p  # blocks: (C, n_blocks) -> (n_blocks, N)

    _same_bytes(inits[dq.input[1]], kn_param(enc.scale).float().contiguous().numpy(),
                f"{tensor} scale")
    if enc.zero_point is None:
        assert len(dq.input) == 2 or not dq.input[2], f"{tensor}: a zero point for a symmetric grid"
    else:
        zp = kn_param(enc.zero_point)
        _same_bytes(inits[dq.input[2]], _codes_numpy(zp, qtype), f"{tensor} zero point")
        if enc.qtype.packed:
            assert inits[dq.input[2]].raw_data == pack_4bit(
                zp.reshape(-1).to(enc.qtype.code_dtype)).numpy().tobytes()


# ----------------------------------------------------------------------------- base weights
@pytest.fixture(scope="module")
def weights_export(tmp_path_factory):
    torch.manual_seed(0)
    model = Stack().eval()
    rules = [graphlora.QuantRule(rf"layers\.{name}", **fields) for name, fields in RULE_CASES.items()]
    rules += [graphlora.QuantRule(rf"layers\.{name}") for name in TENSOR_CASES]
    example = torch.randn(4, WIDTH)
    lm = graphlora.transform(model, rules, (example,), progress=False)
    per_tensor = {
        f"layers.{name}.weight": calibrate_weight(model.layers[name].weight.detach(), spec["qtype"],
                                                  method=spec["method"], axis=None)
        for name, spec in TENSOR_CASES.items()
    }
    lm.run_passes([QuantizeWeightsPass(encodings=per_tensor)])
    path = tmp_path_factory.mktemp("weights") / "weights.onnx"
    export_onnx(lm, path, (example,), lora="merged")
    return model, lm.encodings(), onnx.load(path)


@pytest.mark.parametrize("name", [n for n in [*RULE_CASES, *TENSOR_CASES] if "nf4" not in n])
def test_weight_initializers_are_graphlora_codes(weights_export, name):
    model, encodings, onnx_model = weights_export
    tensor = f"layers.{name}.weight"
    enc = encodings[tensor]
    expected_qtype = RULE_CASES.get(name, {}).get("weight_qtype") or TENSOR_CASES[name]["qtype"]
    assert enc.qtype.name == expected_qtype
    assert (enc.granularity == "PER_TENSOR") == (name in TENSOR_CASES)
    assert (enc.granularity == "PER_BLOCK") == ("block" in name)
    _check_dequantized_weight(onnx_model, tensor, enc, model.layers[name].weight.detach(),
                              channel_last=name.startswith("conv_"))


@pytest.mark.parametrize("name", ["nf4", "nf4_dq"])
def test_nf4_matmulbnb4_inputs_are_graphlora_codes(weights_export, name):
    model, encodings, onnx_model = weights_export
    tensor = f"layers.{name}.weight"
    enc = encodings[tensor]
    assert enc.qtype.name == "nf4" and (enc.double_quant is not None) == (name == "nf4_dq")
    inits = _initializers(onnx_model)
    (b_name,) = [n for n in inits if n == f"{tensor}.nf4"]
    (node,) = _readers(onnx_model, b_name)
    assert node.op_type == "MatMulBnb4" and node.domain == "com.microsoft"
    codes = enc.quantize(model.layers[name].weight.detach())  # (N, K): MatMulBnb4's B
    _same_bytes(inits[node.input[1]], pack_4bit(codes.reshape(-1), high_first=True).numpy(),
                f"{tensor} packed codes")
    absmax = enc.scale.float() if enc.double_quant is None else enc.double_quant.dequantize()
    _same_bytes(inits[node.input[2]], absmax.reshape(-1).numpy(), f"{tensor} absmax")


# ----------------------------------------------------------------------------- LoRA + activations
@pytest.fixture(scope="module")
def branch_export(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(32, 32) for _ in range(3))).eval()
    rule = graphlora.LoraRule
    rules = [
        rule(r"0", rank=4, act_qtype="int8", lora_weight_qtype="int8", lora_act_qtype="uint8"),
        rule(r"1", rank=4, act_qtype="uint8", lora_weight_qtype="uint8", lora_act_qtype="int16"),
        rule(r"2", rank=4, act_qtype="int16", act_symmetric=True, lora_weight_qtype="int4"),
    ]
    example = torch.randn(4, 32)
    lm = graphlora.transform(model, rules, (example,), progress=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    graphlora.calibrate(lm, [(torch.randn(4, 32),) for _ in range(3)], progress=False)
    path = tmp_path_factory.mktemp("branch") / "branch.onnx"
    export_onnx(lm, path, (example,), lora="branch")
    return dict(lm.named_lora_parameters()), lm.encodings(), onnx.load(path)


LORA_WEIGHTS = [f"{i}.lora_{ab}.weight" for i in range(3) for ab in "AB"]
ACTIVATIONS = ["0.input", "0.lora_A.output", "1.input", "1.lora_A.output", "2.input"]


@pytest.mark.parametrize("tensor", LORA_WEIGHTS)
def test_fake_quantized_lora_weights_are_graphlora_codes(branch_export, tensor):
    params, encodings, onnx_model = branch_export
    enc = encodings[tensor]
    assert enc.qtype.name == {"0": "int8", "1": "uint8", "2": "int4"}[tensor[0]]
    _check_dequantized_weight(onnx_model, tensor, enc, params[tensor].detach(), channel_last=False)


@pytest.mark.parametrize("tensor", ACTIVATIONS)
def test_activation_qdq_parameters_are_the_encoding(branch_export, tensor):
    _, encodings, onnx_model = branch_export
    enc = encodings[tensor]
    inits = _initializers(onnx_model)
    pattern = re.compile(rf"(^|\.){re.escape(tensor)}\.scale$")
    (scale_name,) = [n for n in inits if pattern.search(n)]
    readers = _readers(onnx_model, scale_name)
    assert sorted(n.op_type for n in readers) == ["DequantizeLinear", "QuantizeLinear"]
    q = next(n for n in readers if n.op_type == "QuantizeLinear")
    scale = numpy_helper.to_array(inits[q.input[1]])
    assert scale.reshape(-1).tobytes() == enc.scale.float().reshape(-1).numpy().tobytes()
    zp = enc.zero_point if enc.zero_point is not None else torch.zeros((), dtype=torch.int32)
    expected_zp = _codes_numpy(zp.reshape(-1), enc.qtype.name)
    got_zp = numpy_helper.to_array(inits[q.input[2]])
    assert got_zp.dtype == expected_zp.dtype
    assert got_zp.reshape(-1).tobytes() == expected_zp.tobytes()
