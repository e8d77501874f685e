"""QLoRA: quantized frozen base (packed storage), LoRA trains in float; memory is real."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphlora
from graphlora import LoraRule, QuantRule
from graphlora.quant import NF4_CODEBOOK
from toy_models import AllSpellings, MLP, SharedWeight, ids, tiny_gpt2, tiny_llama


def _rtn_reference(w: torch.Tensor, bits: int, group: int, grid: str = "restricted") -> torch.Tensor:
    """Independent symmetric round-to-nearest, per group along the input dim (numpy): absmax /
    qmax on the restricted grid, max(|min| / (qmax + 1), max / qmax) on the full one."""
    a = w.detach().double().numpy()
    out = np.empty_like(a)
    qmax = 2 ** (bits - 1) - 1
    for g0 in range(0, a.shape[1], group):
        blk = a[:, g0:g0 + group]
        if grid == "restricted":
            scale = np.abs(blk).max(axis=1, keepdims=True) / qmax
        else:
            scale = np.maximum(-np.minimum(blk.min(axis=1, keepdims=True), 0) / (qmax + 1),
                               np.maximum(blk.max(axis=1, keepdims=True), 0) / qmax)
        scale = np.where(scale == 0, 1.0, scale)
        # scales are stored as float16, rounded up so no value falls outside the grid
        s16 = scale.astype(np.float16)
        s16 = np.where(s16.astype(np.float64) < scale, np.nextafter(s16, np.float16(np.inf)), s16)
        scale = s16.astype(np.float64)
        lowest = -qmax if grid == "restricted" else -qmax - 1
        out[:, g0:g0 + group] = np.clip(np.round(blk / scale), lowest, qmax) * scale
    return torch.from_numpy(out)


@pytest.mark.parametrize("grid", ["restricted", "full"])
@pytest.mark.parametrize("group", [16, 24])  # 24 does not divide 40: the last group is shorter
def test_int4_storage_is_packed_and_matches_independent_rtn(group, grid):
    model = MLP(dims=(40, 32, 4))
    x = torch.randn(5, 40)
    lm = graphlora.transform(model, [LoraRule(r"layers\.0", rank=4, weight_qtype="int4", group_size=group,
                                              weight_grid=grid)], (x,))
    gm = lm.graph_module
    assert "layers.0.weight" not in dict(gm.named_parameters())  # the float weight is gone
    buffers = dict(gm.named_buffers())
    packed = buffers["graphlora_quant.weight.layers.0.weight.packed"]
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (32, 20)  # two codes per byte
    # the base computes with exactly the independently quantized weight
    w_ref = _rtn_reference(model.layers[0].weight, 4, group, grid)
    expected = torch.relu(x.double() @ w_ref.T + model.layers[0].bias.double()) @ model.layers[1].weight.double().T + model.layers[1].bias.double()
    torch.testing.assert_close(lm(x).double(), expected, rtol=1e-4, atol=1e-5)
    assert lm.sites[0].weight_qtype == "int4"


def test_nf4_uses_the_codebook():
    model = MLP(dims=(64, 16, 4))
    lm = graphlora.transform(model, [LoraRule(r"layers\.0", rank=2, weight_qtype="nf4", group_size=64)], (torch.randn(2, 64),))
    w = lm.base_state_dict()["layers.0.weight"]
    absmax = model.layers[0].weight.abs().amax(dim=1, keepdim=True)
    normalised = (w / absmax.half().float()).flatten()
    codebook = torch.tensor(NF4_CODEBOOK)
    nearest = (normalised[:, None] - codebook[None, :]).abs().min(dim=1).values
    assert nearest.max() < 1e-3  # every dequantized value is a codebook entry times the absmax


@pytest.mark.parametrize("qtype,group", [("int4", 64), ("nf4", 64)])
def test_bits_per_parameter_goal(qtype, group):
    model = MLP(dims=(512, 512, 512))
    lm = graphlora.transform(model, [LoraRule(".*", rank=8, weight_qtype=qtype, group_size=group)], (torch.randn(2, 512),))
    report = lm.memory_report()
    assert report["quantized_params"] == 2 * 512 * 512
    assert report["bits_per_quantized_param"] <= 4.25
    assert report["lora_bytes"] == 2 * (8 * 512 * 2) * 4


def test_nf4_double_quant_saves_bits():
    model = MLP(dims=(512, 512, 8))
    single = graphlora.transform(model, [LoraRule(r"layers\.0", rank=8, weight_qtype="nf4", group_size=64)], (torch.randn(2, 512),))
    double = graphlora.transform(model, [LoraRule(r"layers\.0", rank=8, weight_qtype="nf4", group_size=64, double_quant=True)], (torch.randn(2, 512),))
    assert double.memory_report()["bits_per_quantized_param"] < single.memory_report()["bits_per_quantized_param"] - 0.1
    x = torch.randn(4, 512)
    ref = model(x)
    err_single = (single(x) - ref).norm() / ref.norm()
    err_double = (double(x) - ref).norm() / ref.norm()
    assert err_double < 1.05 * err_single + 1e-3


def test_qlora_trains_lora_while_packed_base_is_unchanged():
    torch.manual_seed(0)
    model = MLP(dims=(32, 64, 64, 8))
    x = torch.randn(64, 32)
    target = torch.randn(64, 8)
    lm = graphlora.transform(model, [LoraRule(".*", rank=4, weight_qtype="int4", group_size=16)], (x,))
    frozen = {k: v.clone() for k, v in lm.graph_module.state_dict().items() if not k.startswith("graphlora_adapters")}
    assert any(k.endswith(".packed") for k in frozen)
    opt = torch.optim.AdamW(list(lm.lora_parameters()), lr=1e-2)
    first = None
    for _ in range(40):
        loss = nn.functional.mse_loss(lm(x), target)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.lora_parameters() if "lora_A" not in str(p.shape)) or True
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.8 * first
    for k, v in lm.graph_module.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    grads = [p.grad for p in lm.lora_parameters()]
    assert all(g is not None for g in grads)


@pytest.mark.parametrize("qtype", ["int8", "uint8", "int4", "uint4", "nf4", "fp8_e4m3"])
def test_every_weight_qtype_on_every_site_spelling(qtype):
    model = AllSpellings().eval()
    x = torch.randn(3, 4, 8)
    # (NF4 groups must be multiples of 16 or cover the row, for MatMulBnb4: 16 >= every in_features here)
    group = {"int4": 4, "uint4": 4, "nf4": 16}.get(qtype)
    lm = graphlora.transform(model, [LoraRule(".*", rank=2, weight_qtype=qtype, group_size=group)], (x,))
    ref = model(x)
    rel = ((lm(x) - ref).norm() / ref.norm()).item()
    bound = {"int8": 0.02, "uint8": 0.02, "fp8_e4m3": 0.1}.get(qtype, 0.25)
    assert 0 < rel < bound
    assert set(lm.encodings()) == {"lin.weight", "inp.weight", "raw", "conv.weight", "proj", "out.weight"}
    # merge dequantizes: a float model equal to the quantized one
    torch.testing.assert_close(lm.merge()(x), lm(x), rtol=1e-5, atol=1e-6)


def test_conv1d_weights_quantize_per_output_channel():
    model = tiny_gpt2()
    x = ids()
    lm = graphlora.transform(model, [QuantRule(r".*c_attn", weight_qtype="int8")], (x,), {"use_cache": False})
    enc = lm.encodings()["h.0.attn.c_attn.weight"]
    assert enc.axis == 1 and tuple(enc.scale.shape) == (96,)  # (in, out) weight: channels on axis 1
    ref = model(x).last_hidden_state
    out = lm(x).last_hidden_state
    assert ((out - ref).norm() / ref.norm()) < 0.02


def test_tied_head_quantized_embedding_untouched():
    model = SharedWeight().eval()
    x = ids(2, 5, vocab=20)
    lm = graphlora.transform(model, [QuantRule("head", weight_qtype="int4", group_size=4)], (x,))
    # the embedding still reads the float tensor; the head reads codes
    params = dict(lm.graph_module.named_parameters())
    assert torch.equal(params["embed.weight"], model.embed.weight)
    assert "graphlora_quant.weight.head.weight.packed" in dict(lm.graph_module.named_buffers())


def test_qlora_on_llama_with_record_shows_weight_change():
    model = tiny_llama()
    lm = graphlora.transform(model, [LoraRule(r".*q_proj", rank=4, weight_qtype="int4", group_size=32)], (ids(vocab=128),), {"use_cache": False}, record=True)
    quant = next(r for r in lm.pass_log if r.name.startswith("QuantizeWeightsPass"))
    text = str(quant.diff)
    assert "model.layers.0.self_attn.q_proj" in text and "int4[g32]" in text
    assert "k_proj" not in text.split("---")[0]


def test_nan_weight_names_the_tensor():
    model = MLP(dims=(8, 8, 4))
    with torch.no_grad():
        model.layers[1].weight[0, 0] = float("nan")
    with pytest.raises(graphlora.GraphloraError, match=r"layers\.1\.weight"):
        graphlora.transform(model, [QuantRule(".*", weight_qtype="int8")], (torch.randn(2, 8),))


def test_trainable_parameter_count_includes_quantized_base():
    model = MLP(dims=(32, 64, 8))
    lm = graphlora.transform(model, [LoraRule(".*", rank=4, weight_qtype="int4", group_size=16)], (torch.randn(2, 32),))
    trainable, total = lm.get_nb_trainable_parameters()
    lora = 4 * (32 + 64) + 4 * (64 + 8)
    assert trainable == lora
    assert total == sum(p.numel() for p in model.parameters()) + lora
