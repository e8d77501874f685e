"""The packed 4-bit layout and the blocked scale layout are what ONNX DequantizeLinear (opset 21)
expects: onnxruntime dequantizes graphlora's bytes to graphlora's values."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from graphlora.quant import calibrate_weight, pack_4bit


def _run_dequantize_linear(x_tensor, scale, zp_tensor, axis, block_size, shape):
    inits = [x_tensor, helper.make_tensor("s", TensorProto.FLOAT, scale.shape, scale.reshape(-1))]
    inputs = ["x", "s"]
    if zp_tensor is not None:
        inits.append(zp_tensor)
        inputs.append("zp")
    node = helper.make_node("DequantizeLinear", inputs, ["y"], axis=axis, block_size=block_size)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph([node], "dq", [], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {})[0]


@pytest.mark.parametrize("qname,method", [("int4", "absmax"), ("uint4", "minmax")])
def test_onnxruntime_reads_packed_int4_blocks(qname, method):
    w = torch.randn(8, 32)
    enc = calibrate_weight(w, qname, method=method, axis=0, block_size=16)
    packed = enc.quantize_to_storage(w)  # (8, 16) bytes, low nibble first
    dtype = TensorProto.INT4 if qname == "int4" else TensorProto.UINT4
    x = helper.make_tensor("x", dtype, [8, 32], packed.numpy().tobytes(), raw=True)
    zp = None
    if enc.zero_point is not None:  # zero points are 4-bit tensors too, packed the same way
        zp_packed = pack_4bit(enc.zero_point.to(torch.uint8).reshape(-1))
        zp = helper.make_tensor("zp", dtype, [8, 2], zp_packed.numpy().tobytes(), raw=True)
    # ONNX blocked quantization: scale has x's rank with the block axis shrunk -> (8, 2)
    got = _run_dequantize_linear(x, enc.scale.numpy(), zp, axis=1, block_size=16,
                                 shape=[8, 32])
    np.testing.assert_allclose(got, enc.dequantize_storage(packed).numpy(), rtol=1e-6, atol=0)
