"""The custom ops: opcheck, one node under torch.export, torch.compile, and the STE gradient."""

import numpy as np
import pytest
import torch

from graphlora.quant import calibrate_weight, ops

ALL_BUT_SCHEMA = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _weights():
    torch.manual_seed(0)
    return torch.randn(12, 40)


def _packed4_args(signed: bool, axis: int = 0):
    w = _weights() if axis == 0 else _weights().t().contiguous()
    enc = calibrate_weight(w, "int4" if signed else "uint4", method="absmax" if signed else "minmax",
                           axis=axis, block_size=16)
    op, args = enc.storage_op(enc.quantize_to_storage(w))
    assert op is torch.ops.graphlora.dequantize_packed4.default
    return w, enc, args


def _nf4_args(dq: bool):
    w = _weights()
    enc = calibrate_weight(w, "nf4", block_size=16, double_quant=dq)
    op, args = enc.storage_op(enc.quantize_to_storage(w))
    return w, enc, op, args


def _cases():
    x = torch.randn(6, 10)
    s_blk = torch.rand(6, 3) + 0.05
    zp_blk = torch.randint(-3, 4, (6, 3), dtype=torch.int32)
    w, enc, p4 = _packed4_args(False)
    _, _, _, nf4 = _nf4_args(False)
    _, _, _, nf4dq = _nf4_args(True)
    fp8 = calibrate_weight(_weights(), "fp8_e4m3")
    q8 = fp8.quantize(_weights())
    return [
        ("quantize", (x, torch.tensor(0.05), torch.tensor(3), None, None, 0, 255, torch.uint8)),
        ("quantize", (x, s_blk, zp_blk, 0, 4, -8, 7, torch.int8)),
        ("dequantize", (torch.randint(-8, 8, (6, 10), dtype=torch.int8), s_blk, None, 0, 4,
                        torch.float32)),
        ("fake_quantize", (x.clone().requires_grad_(), torch.rand(6) + 0.05, None, 0, None, -128, 127)),
        ("fake_quantize", (x.clone().requires_grad_(), s_blk, zp_blk, 0, 4, -8, 7)),
        ("dequantize_packed4", p4),
        ("dequantize_nf4", nf4),
        ("dequantize_nf4_dq", nf4dq),
        ("quantize_fp8", (_weights(), fp8.scale, 0)),
        ("dequantize_fp8", (q8, fp8.scale, 0, torch.float32)),
    ]


@pytest.mark.parametrize("case", range(10))
def test_opcheck(case):
    name, args = _cases()[case]
    # torch's schema checker cannot compare float8 tensors (allclose has no float8 kernel)
    utils = ALL_BUT_SCHEMA if name == "dequantize_fp8" else None
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(ops.OPS[name], args, **kwargs)


class _QLinear(torch.nn.Module):
    """A linear layer whose weight is stored quantized and dequantized by one op."""

    def __init__(self, enc, storage):
        super().__init__()
        self.enc = enc
        self.register_buffer("storage", storage)

    def forward(self, x):
        return x @ self.enc.dequantize_storage(self.storage).t()


class _FakeQuant(torch.nn.Module):
    def __init__(self, enc):
        super().__init__()
        self.enc = enc

    def forward(self, x):
        return self.enc.fake_quantize(x) * 2


def _modules():
    w = _weights()
    mods = {}
    for name, kw in [("int4", {"method": "absmax", "block_size": 16}),
                     ("uint4", {"method": "minmax", "block_size": 16}),
                     ("nf4", {"block_size": 16}),
                     ("nf4_dq", {"block_size": 16, "double_quant": True}),
                     ("int8", {"method": "absmax"}),
                     ("fp8_e4m3", {})]:
        qname = "nf4" if name == "nf4_dq" else name
        enc = calibrate_weight(w, qname, **kw)
        mods[name] = (_QLinear(enc, enc.quantize_to_storage(w)), torch.randn(3, 40))
    act = calibrate_weight(torch.randn(4, 5), "uint8", method="minmax", axis=None)
    mods["fake_quantize"] = (_FakeQuant(act), torch.randn(4, 5))
    return mods


EXPECTED_OP = {
    "int4": "dequantize_packed4", "uint4": "dequantize_packed4", "nf4": "dequantize_nf4",
    "nf4_dq": "dequantize_nf4_dq", "int8": "dequantize", "fp8_e4m3": "dequantize_fp8",
    "fake_quantize": "fake_quantize",
}


@pytest.mark.parametrize("name", list(EXPECTED_OP))
def test_export_shows_one_node(name):
    mod, x = _modules()[name]
    ep = torch.export.export(mod, (x,), strict=False)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    ours = [t for t in targets if getattr(t, "namespace", None) == "graphlora"]
    assert ours == [ops.OPS[EXPECTED_OP[name]]]
    torch.testing.assert_close(ep.module()(x), mod(x))


@pytest.mark.parametrize("name", list(EXPECTED_OP))
def test_compile_aot_eager(name):
    torch._dynamo.reset()
    mod, x = _modules()[name]
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), mod(x))


@pytest.mark.slow
def test_compile_inductor_once():
    torch._dynamo.reset()
    mods = _modules()
    mod4, x4 = mods["int4"]
    fq, xf = mods["fake_quantize"]

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = mod4, fq

        def forward(self, x, y):
            return self.a(x), self.b(y)

    m = Both()
    compiled = torch.compile(m, backend="inductor", fullgraph=True)
    for got, want in zip(compiled(x4, xf), m(x4, xf)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------- STE gradients
@pytest.mark.parametrize("zp", [None, 3])
def test_fake_quantize_ste_gradient(zp):
    scale = 0.1
    qmin, qmax = (-8, 7) if zp is None else (0, 15)
    x = torch.linspace(-2.0, 2.0, 401, dtype=torch.float32).requires_grad_()
    upstream = torch.randn(401)
    zp_t = None if zp is None else torch.tensor(zp)
    y = ops.fake_quantize(x, torch.tensor(scale), zp_t, None, None, qmin, qmax)
    y.backward(upstream)
    # independent numpy: the rounded, unclamped code decides whether the gradient passes
    xs = x.detach().numpy()
    code = np.rint(xs / np.float32(scale)) + (zp or 0)
    inside = (code >= qmin) & (code <= qmax)
    np.testing.assert_array_equal(x.grad.numpy(), np.where(inside, upstream.numpy(), 0.0))
    assert inside.any() and (~inside).any()


def test_fake_quantize_ste_per_block_and_torch_reference():
    x = torch.randn(4, 10).requires_grad_()
    s = torch.rand(4, 3) + 0.05
    y = ops.fake_quantize(x, s, None, 0, 4, -8, 7)
    g = torch.randn(4, 10)
    y.backward(g)
    s_full = s.repeat_interleave(4, dim=1)[:, :10]
    code = torch.round(x.detach() / s_full)
    inside = (code >= -8) & (code <= 7)
    assert torch.equal(x.grad, torch.where(inside, g, torch.zeros_like(g)))
    # per-tensor agrees with torch's own fake_quantize (same clipped STE)
    x2 = torch.randn(50).mul(3).requires_grad_()
    x3 = x2.detach().clone().requires_grad_()
    ops.fake_quantize(x2, torch.tensor(0.1), torch.tensor(5), None, None, 0, 255).sum().backward()
    torch.fake_quantize_per_tensor_affine(x3, 0.1, 5, 0, 255).sum().backward()
    assert torch.equal(x2.grad, x3.grad)
