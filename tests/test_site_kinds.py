"""LoRA on embedding and convolution sites (``LoraRule(site_kinds=...)``), against PEFT's
``lora.Embedding`` / ``lora.Conv1d/2d/3d``.

Expected values come from the original model, from LoRA written out by hand with torch's own
``F.embedding`` / ``F.conv*d`` on the factors, or from real PEFT; never from graphlora's code.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_onnx_fixtures import rel_err
from toy_models import canonical_execution, fill_peft_factors, ids, tiny_llama

import graphlora
from graphlora import LoraRule
from graphlora.errors import ExportError, GraphloraError, GraphloraWarning, RuleError

ATOL = 1e-5
ALL = ("linear", "embedding", "conv")


class ConvNet(nn.Module):
    """Token embedding, Conv1d, a grouped Conv1d, a strided/dilated Conv2d, a Conv3d with
    ``padding="same"``, a linear head."""

    def __init__(self, dilation: int = 2, groups: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.conv = nn.Conv1d(16, 8, 3, padding=1)
        self.grouped = nn.Conv1d(8, 8, 3, padding=1, groups=groups)
        self.c2 = nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=dilation)
        self.c3 = nn.Conv3d(6, 4, (1, 3, 3), padding="same", bias=False)
        self.head = nn.Linear(8, 5)

    def forward(self, tokens):
        h = self.emb(tokens).transpose(1, 2)
        h = self.grouped(self.conv(h))
        z = self.c2(h[:, :, None, :].expand(-1, -1, 6, -1))
        z = self.c3(z[:, :, None])
        return self.head(h.transpose(1, 2)), z


def _net(seed: int = 0, **kwargs) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(**kwargs).eval()


def _tokens(seed: int = 0):
    t = ids(2, 7, vocab=50, seed=seed)
    t[0, 0] = 0  # the padding row is looked up too
    return t


def _perturb(lm, seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _factors(lm, path):
    sd = lm.lora_state_dict()
    return sd[f"{path}.lora_A.weight"], sd[f"{path}.lora_B.weight"]


def _by_hand(model: ConvNet, lm, tokens, scale: float):
    """The model's forward with LoRA written out per layer from the factors, as PEFT's layers do."""
    conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def conv(layer, path, x):
        a, b = _factors(lm, path)
        fn = conv_fn[a.dim() - 2]
        h = fn(x, a, None, layer.stride, layer.padding, layer.dilation, 1)
        return layer(x) + fn(h, b, None, 1, 0, 1, layer.groups) * scale

    a, b = _factors(lm, "emb")
    h = model.emb(tokens) + F.embedding(tokens, a.t(), padding_idx=0) @ b.t() * scale
    h = h.transpose(1, 2)
    h = conv(model.grouped, "grouped", conv(model.conv, "conv", h))
    z = conv(model.c2, "c2", h[:, :, None, :].expand(-1, -1, 6, -1))
    z = conv(model.c3, "c3", z[:, :, None])
    a, b = _factors(lm, "head")
    y = h.transpose(1, 2)
    return model.head(y) + (y @ a.t()) @ b.t() * scale, z


def test_default_rules_leave_embeddings_and_convolutions_alone():
    model = _net()
    with pytest.warns(GraphloraWarning, match=r"matches conv and embedding sites; add site_kinds"):
        lm = graphlora.transform(model, [LoraRule("head", rank=2), LoraRule("emb|c2", rank=2)], (_tokens(),))
    assert [s.module_path for s in lm.sites] == ["head"]


def test_fresh_model_equals_original_and_factors_start_as_peft():
    model = _net()
    lm = graphlora.transform(model, [LoraRule(".*", rank=4, site_kinds=ALL)], (_tokens(),))
    assert {s.module_path: s.kind for s in lm.sites} == {
        "emb": "embedding", "conv": "conv", "grouped": "conv", "c2": "conv", "c3": "conv", "head": "linear"}
    for got, want in zip(lm(_tokens()), model(_tokens())):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    a, b = _factors(lm, "emb")  # PEFT's embedding init: A = 0, B ~ N(0, 1)
    assert a.shape == (4, 50) and b.shape == (16, 4) and not a.any() and b.std() > 0.5
    a, b = _factors(lm, "c2")  # PEFT's conv init: A kaiming over in * kernel, B = 0
    assert a.shape == (4, 8, 3, 3) and b.shape == (6, 4, 1, 1) and not b.any()
    assert a.abs().max() <= 1 / (8 * 9) ** 0.5
    assert _factors(lm, "grouped")[1].shape == (8, 2, 1)  # B in the layer's 2 groups: rank / groups


@pytest.mark.parametrize("fused", [True, False])
def test_random_factors_match_lora_written_out(fused):
    model = _net()
    lm = graphlora.transform(model, [LoraRule(".*", rank=4, alpha=8, site_kinds=ALL)], (_tokens(),))
    _perturb(lm)
    lm.fused_execution = fused
    tokens = _tokens(seed=3)
    with torch.no_grad():
        got, want = lm(tokens), _by_hand(model, lm, tokens, scale=2.0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


def test_merge_equals_unmerged_and_a_grouped_convolution_is_refused():
    model = _net()
    rule = LoraRule("emb|conv|c2|c3|head", rank=4, alpha=6, site_kinds=ALL)
    lm = graphlora.transform(model, [rule], (_tokens(),))
    _perturb(lm)
    tokens = _tokens(seed=4)
    with torch.no_grad():
        want = lm(tokens)
        merged = lm.merge()
        got = merged(tokens)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
    assert not any("lora" in k for k in merged.state_dict())
    grouped = graphlora.transform(_net(), [LoraRule("grouped", rank=2, site_kinds=("conv",))], (_tokens(),))
    with pytest.raises(GraphloraError, match="groups=2 cannot be merged"):
        grouped.merge()


def test_backward_reaches_the_factors_only_and_equals_peft():
    from peft import LoraConfig, get_peft_model

    model = _net(dilation=1)  # PEFT's conv A ignores dilation (see docs/applying-lora.md)
    targets = ["emb", "conv", "grouped", "c2", "c3", "head"]
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    lm = graphlora.transform(model, [LoraRule(".*", rank=4, alpha=8, site_kinds=ALL)], (_tokens(),))
    _perturb(lm)
    ours = lm.lora_state_dict()
    with torch.no_grad():  # the same factors in PEFT's model
        for name, p in peft.named_parameters():
            if "lora_" in name:
                path = name.removeprefix("base_model.model.").split(".lora_")[0]
                which = "lora_A" if ".lora_A." in name or "lora_embedding_A" in name else "lora_B"
                p.copy_(ours[f"{path}.{which}.weight"])
    tokens = _tokens(seed=5)
    y, z = lm(tokens)
    (y.square().sum() + z.square().sum()).backward()
    py, pz = peft(tokens)
    (py.square().sum() + pz.square().sum()).backward()
    trainable = {id(p) for p in lm.parameters() if p.requires_grad}
    assert trainable == {id(p) for _, p in lm.named_lora_parameters()} and len(trainable) == 12
    peft_grads = {n.removeprefix("base_model.model.").replace(".default", "").replace("lora_embedding_A", "lora_A.weight")
                  .replace("lora_embedding_B", "lora_B.weight"): p.grad for n, p in peft.named_parameters() if "lora_" in n}
    for name, p in lm.named_lora_parameters():
        torch.testing.assert_close(p.grad, peft_grads[name], atol=1e-4, rtol=1e-4)
    emb_a = dict(lm.named_lora_parameters())["emb.lora_A.weight"]
    assert not emb_a.grad[:, 0].any()  # padding_idx: the lookup's gradient skips row 0, as in PEFT


def test_adapters_load_in_peft_and_peft_adapters_load_here(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    model = _net(dilation=1)
    tokens = _tokens(seed=6)
    lm = graphlora.transform(copy.deepcopy(model), [LoraRule(".*", rank=4, alpha=8, site_kinds=ALL)], (tokens,))
    _perturb(lm)
    with torch.no_grad():
        want = lm(tokens)
    lm.save_pretrained(tmp_path / "ours", only_save_adapters=True)
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert tuple(keys["base_model.model.emb.lora_embedding_A"].shape) == (4, 50)
    assert tuple(keys["base_model.model.c3.lora_A.weight"].shape) == (4, 6, 1, 3, 3)
    with pytest.warns(UserWarning, match="groups > 1"):
        peft = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        for g, w in zip(peft(tokens), want):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0)

    with pytest.warns(UserWarning, match="groups > 1"):
        theirs = get_peft_model(copy.deepcopy(model), LoraConfig(
            r=2, lora_alpha=3, target_modules=["emb", "c2", "grouped", "head"]))
    fill_peft_factors(theirs, seed=9, std=0.2)
    with torch.no_grad():
        want = theirs(tokens)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = graphlora.load_adapter(copy.deepcopy(model), tmp_path / "peft", example_args=(tokens,))
    assert {s.module_path: s.kind for s in loaded.sites} == {
        "emb": "embedding", "grouped": "conv", "c2": "conv", "head": "linear"}
    with torch.no_grad():
        for g, w in zip(loaded(tokens), want):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


def test_an_adapter_with_the_wrong_kernel_is_refused_naming_the_key(tmp_path):
    from peft import LoraConfig, get_peft_model

    class Other(ConvNet):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(16, 8, 5, padding=2)  # a 5-tap kernel where ConvNet has 3

    torch.manual_seed(0)
    get_peft_model(Other(), LoraConfig(r=2, target_modules=["conv"])).save_pretrained(tmp_path)
    with pytest.raises(GraphloraError, match=r"conv\.lora_A\.weight: expected \[2, 16, 3\], found \[2, 16, 5\]"):
        graphlora.load_adapter(_net(), tmp_path, example_args=(_tokens(),))


def test_llama_embed_tokens_lora_matches_peft_both_ways(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_llama()
    inputs = {"input_ids": ids(2, 6, vocab=128)}
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8,
                                                          target_modules=["embed_tokens", "q_proj"]))
    fill_peft_factors(peft, seed=2, std=0.1)
    with torch.no_grad():
        want = peft(**inputs).logits
    peft.save_pretrained(tmp_path / "peft")
    lm = graphlora.load_adapter(copy.deepcopy(base), tmp_path / "peft", example_kwargs=inputs)
    with torch.no_grad():
        torch.testing.assert_close(lm(**inputs).logits, want, atol=ATOL, rtol=0)

    rules = [LoraRule(r".*embed_tokens", rank=4, alpha=8, site_kinds=("embedding",)),
             LoraRule(r".*q_proj", rank=4, alpha=8)]
    ours = graphlora.transform(copy.deepcopy(base), rules, (), inputs)
    _perturb(ours, std=0.05)
    with torch.no_grad():
        want = ours(**inputs).logits
    ours.save_pretrained(tmp_path / "ours", only_save_adapters=True)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False  # an embedding is not a Conv1D
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, want, atol=ATOL, rtol=0)


def test_peft_s_copy_of_the_embedding_is_accepted_only_when_it_is_the_model_s(tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    base = tiny_llama()
    inputs = {"input_ids": ids(2, 6, vocab=128)}
    get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["embed_tokens"])).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in tensors  # PEFT's save_embedding_layers="auto" when embed_tokens is targeted
    lm = graphlora.load_adapter(copy.deepcopy(base), tmp_path, example_kwargs=inputs)
    assert [s.kind for s in lm.sites] == ["embedding"]
    tensors[key][3] += 1.0  # a trained or resized vocabulary
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(GraphloraError, match=r"carries its own weight for the embedding 'model.embed_tokens'"):
        graphlora.load_adapter(copy.deepcopy(base), tmp_path, example_kwargs=inputs)


def test_diffusers_unet_conv_lora_loads_in_peft(tmp_path):
    import diffusers
    from peft import PeftModel

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    rule = LoraRule(r".*(conv1|conv2|conv_in|conv_out|to_q|to_v)", rank=4, site_kinds=("linear", "conv"))
    lm = graphlora.transform(copy.deepcopy(unet), [rule], (x, t))
    kinds = [s.kind for s in lm.sites]
    assert kinds.count("conv") >= 10 and "linear" in kinds
    _perturb(lm, std=0.05)
    with torch.no_grad():
        want = lm(x, t)
    want = want[0] if isinstance(want, (tuple, list)) else want.sample
    lm.save_pretrained(tmp_path, only_save_adapters=True)
    peft = PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(x, t).sample, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["merged", "branch"])
def test_onnx_export_matches_torch(tmp_path, mode):
    from graphlora.onnx import InferenceSession, export_onnx

    targets = "emb|conv|c2|c3|head" if mode == "merged" else ".*"
    lm = graphlora.transform(_net(), [LoraRule(targets, rank=4, site_kinds=ALL)], (_tokens(),))
    _perturb(lm)
    path = tmp_path / "m.onnx"
    export_onnx(lm, path, (_tokens(),), lora=mode)
    tokens = _tokens(seed=7)
    session = InferenceSession(path, "cpu", accuracy_level=0)
    got = session.run(None, {session.get_inputs()[0].name: tokens.numpy()})
    with canonical_execution(lm), torch.no_grad():
        want = lm(tokens)
    for g, w in zip(got, want):
        assert rel_err(g, w.numpy()) < 1e-4  # test_onnx_export's float bound


def test_merged_onnx_of_a_grouped_convolution_is_refused(tmp_path):
    from graphlora.onnx import export_onnx

    lm = graphlora.transform(_net(), [LoraRule("grouped", rank=2, site_kinds=("conv",))], (_tokens(),))
    with pytest.raises(ExportError, match="groups=2"):
        export_onnx(lm, tmp_path / "m.onnx", (_tokens(),), lora="merged")
    assert not (tmp_path / "m.onnx").exists()


def _quantized_rules(qtype_emb: str = "int4", qtype_conv: str = "int8"):
    return [LoraRule("emb", rank=4, weight_qtype=qtype_emb, group_size=8, weight_grid="restricted",
                     site_kinds=("embedding",)),
            LoraRule("conv|c2|c3", rank=4, weight_qtype=qtype_conv, weight_grid="restricted", site_kinds=("conv",)),
            LoraRule("head", rank=4)]


def _on_grid_by_hand(model: ConvNet, emb_scale: torch.Tensor) -> ConvNet:
    """The model with its embedding on a symmetric int4 grid per row and block of 8 with the given
    scales (fp16, which the caller checks are max|w| / 7) and its convolutions on an int8 grid per
    output channel (max|w| / 127)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        w = ref.emb.weight.view(50, 2, 8)
        scale = emb_scale.float().view(50, 2, 1)
        # row 0 is the zero padding row: any scale keeps it zero
        torch.testing.assert_close(scale[1:], w[1:].abs().amax(-1, keepdim=True) / 7, rtol=1e-3, atol=1e-6)
        ref.emb.weight.copy_(((w / scale).round().clamp(-7, 7) * scale).view(50, 16))
        for layer in (ref.conv, ref.c2, ref.c3):
            w = layer.weight
            scale = w.abs().flatten(1).amax(1).view(-1, *[1] * (w.dim() - 1)) / 127
            w.copy_((w / scale).round().clamp(-127, 127) * scale)
    return ref


def test_quantized_embedding_and_convolution_weights_are_stored_as_codes():
    model = _net()
    lm = graphlora.transform(model, _quantized_rules(), (_tokens(),))
    assert {s.module_path: s.weight_qtype for s in lm.sites} == {
        "emb": "int4", "conv": "int8", "c2": "int8", "c3": "int8", "head": None}
    state = lm.state_dict()
    assert not any(k.endswith(("emb.weight", "conv.weight", "c2.weight", "c3.weight")) for k in state)
    tokens = _tokens(seed=8)
    encoding = lm.encodings()["emb.weight"]
    assert (encoding.axis, encoding.block_size, encoding.scale.dtype) == (0, 8, torch.float16)
    with torch.no_grad():
        for got, want in zip(lm(tokens), _on_grid_by_hand(model, encoding.scale)(tokens)):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        _perturb(lm)  # LoRA on the quantized base: the branch reads the site's own input
        got = lm(tokens)
        merged = lm.merge()(tokens)  # a merged QLoRA model is float
    for g, m in zip(got, merged):
        torch.testing.assert_close(m, g, atol=1e-4, rtol=0)


def test_quantized_sites_save_keep_quantized_and_export_qdq(tmp_path):
    import onnx

    from graphlora.onnx import InferenceSession, export_onnx

    lm = graphlora.transform(_net(), _quantized_rules("uint4"), (_tokens(),))
    _perturb(lm)
    lm.save_pretrained(tmp_path / "q", keep_quantized=True)
    again = graphlora.load_quantized(_net(seed=5), tmp_path / "q", (_tokens(),))
    tokens = _tokens(seed=9)
    with torch.no_grad():
        want = lm(tokens)
        for g, w in zip(again(tokens), want):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
    for mode in ("branch", "merged"):
        path = tmp_path / f"{mode}.onnx"
        export_onnx(lm, path, (_tokens(),), lora=mode)
        session = InferenceSession(path, "cpu", accuracy_level=0)
        got = session.run(None, {session.get_inputs()[0].name: tokens.numpy()})
        if mode == "branch":  # merged: W + sBA is quantized again, so it is another function
            for g, w in zip(got, want):
                assert rel_err(g, w.numpy()) < 1e-4
        graph = onnx.load(path).graph
        dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
        codes = {i.name: i.data_type for i in graph.initializer}
        fed = {n.op_type for n in graph.node for i in n.input if i in dq}
        assert {"Gather", "Conv"} <= fed
        assert {codes[dq[o].input[0]] for o in dq if dq[o].input[0] in codes} == {
            onnx.TensorProto.UINT4, onnx.TensorProto.INT8}


@pytest.mark.parametrize("rule, message", [
    (LoraRule("c2", rank=2, weight_qtype="nf4", site_kinds=("conv",)), "quantized to integer grids"),
    (LoraRule("c2", rank=2, weight_qtype="int4", group_size=8, site_kinds=("conv",)), "per output channel"),
    (LoraRule("c2", rank=2, act_qtype="uint8", site_kinds=("conv",)), "act_qtype is not supported on conv"),
    (LoraRule("emb", rank=2, use_dora=True, site_kinds=("embedding",)), "DoRA is supported on linear sites only"),
    (LoraRule("emb", rank=2, init="pissa", site_kinds=("embedding",)), "init='pissa' is supported on linear"),
    (LoraRule("grouped", rank=3, site_kinds=("conv",)), "rank 3 is not a multiple of the convolution's groups=2"),
])
def test_what_these_sites_do_not_support_is_refused_at_transform(rule, message):
    with pytest.raises(RuleError, match=message):
        graphlora.transform(_net(), [rule], (_tokens(),))


def test_site_kinds_are_checked_and_round_trip_through_rules_files(tmp_path):
    from graphlora.rules_file import dump_rules, parse_rules

    with pytest.raises(RuleError, match="site_kinds must be a non-empty list"):
        graphlora.transform(_net(), [LoraRule(".*", rank=2, site_kinds=("conv2d",))], (_tokens(),))
    rules = [LoraRule("emb|c2", rank=2, site_kinds=["embedding", "conv"])]
    assert rules[0].site_kinds == ("embedding", "conv")
    for fmt in ("toml", "json"):
        assert parse_rules(dump_rules(rules, fmt), fmt=fmt) == rules


class Einsums(nn.Module):
    """Two contractions with parameters: several contracted labels (``ij``), and the parameter
    first with an ellipsis on the activation."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.randn(4, 6, 5) / 5)
        self.mix = nn.Parameter(torch.randn(8, 5) / 3)

    def forward(self, x):
        h = torch.einsum("btij,ijk->btk", x, self.proj.weight)
        return torch.einsum("hd,...d->...h", self.mix, h)


def test_einsum_sites_match_lora_written_out_merge_save_and_export(tmp_path):
    from graphlora.onnx import InferenceSession, export_onnx

    torch.manual_seed(0)
    model = Einsums().eval()
    x = torch.randn(2, 3, 4, 6)
    lm = graphlora.transform(model, [LoraRule(".*", rank=2, alpha=4, site_kinds=("einsum",))], (x,))
    assert [(s.module_path, s.kind, s.in_features, s.out_features) for s in lm.sites] == [
        ("proj", "einsum", 24, 5), ("mix", "einsum", 5, 8)]
    torch.testing.assert_close(lm(x), model(x), atol=ATOL, rtol=0)
    _perturb(lm)
    sd = lm.lora_state_dict()
    a, b = sd["proj.lora_A.weight"], sd["proj.lora_B.weight"]
    assert a.shape == (2, 24) and b.shape == (5, 2)
    ref = copy.deepcopy(model)
    with torch.no_grad():  # A's columns run over the contracted labels i, j in the parameter's order
        ref.proj.weight += torch.einsum("kr,rij->ijk", b, a.reshape(2, 4, 6)) * 2.0
        ref.mix += sd["mix.lora_B.weight"] @ sd["mix.lora_A.weight"] * 2.0
    x2 = torch.randn(2, 5, 4, 6)
    with torch.no_grad():
        want = lm(x2)
        torch.testing.assert_close(want, ref(x2), atol=ATOL, rtol=0)
    path = tmp_path / "m.onnx"
    export_onnx(lm, path, (x,), lora="branch")
    session = InferenceSession(path, "cpu", accuracy_level=0)
    assert rel_err(session.run(None, {session.get_inputs()[0].name: x2.numpy()})[0], want.numpy()) < 1e-4
    with pytest.warns(GraphloraWarning):  # PEFT has no einsum layer: only graphlora loads this adapter
        lm.save_pretrained(tmp_path / "adapter", only_save_adapters=True)
    again = graphlora.load_adapter(copy.deepcopy(model), tmp_path / "adapter", example_args=(x,))
    with torch.no_grad():
        torch.testing.assert_close(again(x2), want, atol=ATOL, rtol=0)
        torch.testing.assert_close(lm.merge()(x2), want, atol=1e-4, rtol=0)


def test_a_tied_embedding_and_lm_head_each_get_their_own_lora(tmp_path):
    """One tensor read as the embedding's ``(vocab, dim)`` table and as lm_head's ``(out, in)``
    weight: two sites, each with its own orientation, pair and merged weight."""
    from peft import PeftModel

    from graphlora.onnx import export_onnx

    base = tiny_llama(tie=True)
    inputs = {"input_ids": ids(2, 6, vocab=128)}
    rules = [LoraRule(r".*embed_tokens", rank=4, site_kinds=("embedding",)), LoraRule("lm_head", rank=4)]
    lm = graphlora.transform(copy.deepcopy(base), rules, (), inputs)
    sd = lm.lora_state_dict()
    assert sd["model.embed_tokens.lora_A.weight"].shape == (4, 128)  # (r, vocab): rows are inputs
    assert sd["lm_head.lora_A.weight"].shape == (4, 64)  # (r, hidden): the lm_head reads (out, in)
    _perturb(lm)
    with torch.no_grad():
        want = lm(**inputs).logits
        merged = lm.merge()(**inputs)
    merged = merged.logits if hasattr(merged, "logits") else merged["logits"]
    torch.testing.assert_close(merged, want, atol=1e-4, rtol=0)
    lm.save_pretrained(tmp_path, only_save_adapters=True)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(**inputs).logits, want, atol=ATOL, rtol=0)
    with pytest.raises(ExportError, match="tied across module paths"):
        export_onnx(lm, tmp_path / "m.onnx", (), inputs, lora="merged", kv_cache=False)
    from transformers import AutoModelForCausalLM

    lm.save_pretrained(tmp_path / "merged", save_adapters_separately=False)  # untied: two tensors
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(reloaded(**inputs).logits, want, atol=1e-4, rtol=0)


def test_embedding_factors_for_a_linear_layer_are_refused_naming_it(tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    get_peft_model(_net(), LoraConfig(r=2, target_modules=["head"])).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = {k.replace("lora_A.weight", "lora_embedding_A").replace("lora_B.weight", "lora_embedding_B"): v
               for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(GraphloraError, match=r"holds an embedding's factors .* for 'head', which is a site of kind 'linear'"):
        graphlora.load_adapter(_net(), tmp_path, example_args=(_tokens(),))
