"""Every spelling of a linear layer is recognised, with the right module path and layout."""

import pytest
import torch

import graphlora
from graphlora.sites import find_linear_sites
from toy_models import AllSpellings, SharedWeight, ids, tiny_gpt2, tiny_llama


def _by_path(sites):
    return {(s.module_path, s.spec.use_index): s.spec for s in sites}


@pytest.mark.parametrize("method", ["export", "symbolic"])
def test_all_spellings_are_sites(method):
    m = AllSpellings().eval()
    gm = graphlora.trace(m, (torch.randn(2, 3, 8),), method=method)
    specs = _by_path(find_linear_sites(gm))
    assert set(specs) == {("lin", 0), ("inp", 0), ("raw", 0), ("conv", 0), ("proj", 0), ("out", 0)}
    assert specs[("lin", 0)].kind == "linear" and specs[("lin", 0)].use_layout == "out_in"
    assert specs[("inp", 0)].kind == "linear"  # F.linear in the parent's forward
    assert specs[("raw", 0)].weight_transposed and specs[("raw", 0)].use_layout == "out_in"
    assert (specs[("raw", 0)].in_features, specs[("raw", 0)].out_features) == (16, 12)
    assert specs[("conv", 0)].kind == "addmm" and specs[("conv", 0)].param_layout == "in_out"
    assert (specs[("conv", 0)].in_features, specs[("conv", 0)].out_features) == (12, 10)
    assert specs[("proj", 0)].kind == "matmul" and specs[("proj", 0)].use_layout == "in_out"
    assert specs[("out", 0)].bias_index is None


def test_shared_and_tied_weights():
    m = SharedWeight().eval()
    gm = graphlora.trace(m, (ids(2, 5, vocab=20),))
    sites = find_linear_sites(gm)
    paths = [(s.module_path, s.spec.use_index) for s in sites]
    # block applied twice: two uses of one module path; head's weight is tied to the embedding
    assert paths == [("block", 0), ("block", 1), ("head", 0)]


def test_gpt2_conv1d_sites():
    gm = graphlora.trace(tiny_gpt2(), (ids(),), {"use_cache": False})
    specs = {s.module_path: s.spec for s in find_linear_sites(gm)}
    assert set(specs) == {f"h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    c_attn = specs["h.0.attn.c_attn"]
    assert c_attn.kind == "addmm" and c_attn.param_layout == "in_out"
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)


def test_llama_module_paths_and_tied_head():
    gm = graphlora.trace(tiny_llama(tie=True), (ids(vocab=128),), {"use_cache": False})
    paths = [s.module_path for s in find_linear_sites(gm)]
    assert "model.layers.1.mlp.down_proj" in paths
    assert paths[-1] == "lm_head"  # not model.embed_tokens, although the weight is shared
    assert len(paths) == 2 * 7 + 1


@pytest.mark.parametrize("method", ["export", "symbolic"])
def test_every_spelling_rewrites_as_canonical_linear(method):
    """as_linear gives each site aten.linear(x, W_(out,in), bias) with a spec that says so: the
    same spec (kind aside) recognition finds in the rewritten graph, and the same function."""
    m = AllSpellings().eval()
    x = torch.randn(2, 3, 8)
    gm = graphlora.trace(m, (x,), method=method)
    expected = gm(x)
    sites = find_linear_sites(gm)
    before = {s.module_path: s.spec for s in sites}
    changed = {s.module_path: s.as_linear() for s in sites}
    # export spells nn.Linear / F.linear as aten.linear already; symbolic_trace as torch's F.linear
    already = {"lin", "inp", "out"} if method == "export" else set()
    assert changed == {path: path not in already for path in before}
    assert not any(s.as_linear() for s in sites)  # already canonical
    gm.graph.lint()
    gm.recompile()
    torch.testing.assert_close(gm(x), expected, rtol=1e-6, atol=1e-6)
    assert all(s.node.target == torch.ops.aten.linear.default for s in sites)
    found = {s.module_path: s.spec for s in find_linear_sites(gm)}
    assert found == {s.module_path: s.spec for s in sites}
    for path, spec in found.items():
        old = before[path]
        assert (spec.kind, spec.input_index, spec.weight_index) == ("linear", 0, 1)
        assert (spec.use_layout, spec.param_layout, spec.in_features, spec.out_features) == (
            old.use_layout, old.param_layout, old.in_features, old.out_features)
    assert found["raw"].weight_transposed is False  # x @ raw.T: the transpose is stripped
    assert found["conv"].weight_transposed is True and found["conv"].bias_index == 2  # addmm: one inserted
    assert found["proj"].weight_transposed is True and found["proj"].bias_index is None
    assert not any(n.op == "call_function" and n.target in (torch.ops.aten.addmm.default, torch.addmm)
                   for n in gm.graph.nodes)


def test_addmm_with_a_matrix_bias_stays_as_it_is():
    class MatrixBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 3))
            self.b = torch.nn.Parameter(torch.randn(5, 3))  # one bias per row: not linear's

        def forward(self, x):
            return torch.addmm(self.b, x, self.w)

    gm = graphlora.trace(MatrixBias(), (torch.randn(5, 4),))
    (site,) = find_linear_sites(gm)
    assert site.spec.kind == "addmm" and not site.as_linear()
    assert site.node.target == torch.ops.aten.addmm.default
