"""Execution fusion covers every site spelling: Conv1D ``addmm``, ``x @ W.T``, ``mm``, packed bases.

The execution copy first rewrites each site as ``aten.linear`` (CanonicalLinearPass), so LoRA fusion
and sibling fusion apply to a GPT-2 like to a BERT. The fused copy computes the canonical graph's
function up to float summation order, trains only the LoRA weights, and leaves the canonical graph
(what passes, graph_text, saving and export see) exactly as it was.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphlora
from graphlora import LoraRule
from graphlora.diff import graph_text
from graphlora.passes import fuse_lora  # noqa: F401  (registers graphlora::lora_linear)
from graphlora.passes.fuse_siblings import sibling_linears, sibling_lora_linears
from toy_models import AllSpellings, canonical_execution, ids, tiny_gpt2

aten = torch.ops.aten
LORA_LINEAR = torch.ops.graphlora.lora_linear.default
FUSED_SITE = fuse_lora.lora_linear_or_branch  # what a fused site runs: the op where it pays
GPT2_TARGETS = r".*(c_attn|c_proj|c_fc)"


class TransposedWeights(nn.Module):
    """Bare parameters read as ``x @ W.T``: two siblings on one input, then an output projection."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wq = nn.Parameter(torch.randn(6, 8, generator=g) * 0.3)
        self.wk = nn.Parameter(torch.randn(6, 8, generator=g) * 0.3)
        self.wo = nn.Parameter(torch.randn(5, 6, generator=g) * 0.3)

    def forward(self, x):
        q = x @ self.wq.T
        k = x @ self.wk.T
        return torch.tanh(q * k) @ self.wo.T


def _randomize_lora(lm, std=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _output(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _assert_close_to_scale(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str) -> None:
    """Within ``rel`` of ``ref``'s largest value: a gradient sums many products, and summing them
    in another order moves its small entries by an amount set by the large ones (in float64 the
    fused and canonical gradients agree to 1e-13)."""
    err = (got - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"{what}: max error {err:.3g}, scale {ref.abs().max().item():.3g}"


def _assert_fused_matches_canonical(lm, *args, **kwargs) -> None:
    """Same output and LoRA gradients from the fused copy as from the canonical graph, up to
    float summation order: with the size-dependent choice (these tiny calls run op for op) and
    with every fused op forced to its fused form (``"always"``)."""
    with canonical_execution(lm):
        ref = _output(lm(*args, **kwargs))
        ref.pow(2).sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in lm.named_lora_parameters()}
    lm.zero_grad()
    for mode in (True, "always"):
        lm.fused_execution = mode
        fused = _output(lm(*args, **kwargs))
        fused.pow(2).sum().backward()
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
        for k, p in lm.named_lora_parameters():
            _assert_close_to_scale(p.grad, ref_grads[k], 1e-4, f"{k} ({mode})")
        lm.zero_grad()
    lm.fused_execution = True


def test_gpt2_conv1d_sites_fuse_with_their_lora_branches():
    x = ids(3, 9)
    lm = graphlora.transform(tiny_gpt2(), [LoraRule(GPT2_TARGETS, rank=2, alpha=3.0)], (x,), {"use_cache": False})
    _randomize_lora(lm)
    text = graph_text(lm.graph_module)
    fused = lm._executable()
    targets = _targets(fused)
    # 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj): each Conv1D addmm and its branch, one op
    assert targets.count(FUSED_SITE) == 8
    assert aten.addmm.default not in targets and aten.linear.default not in targets
    # the canonical graph is untouched: the model's own addmm sites, separate branches
    assert graph_text(lm.graph_module) == text
    assert {s.spec.kind for s in graphlora.sites.tagged_sites(lm.graph_module)} == {"addmm"}
    _assert_fused_matches_canonical(lm, x)


def test_gpt2_training_with_fused_execution_updates_only_lora_weights():
    torch.manual_seed(0)
    x = ids(2, 8)
    lm = graphlora.transform(tiny_gpt2(), [LoraRule(GPT2_TARGETS, rank=4)], (x,), {"use_cache": False})
    assert lm.fused_execution
    base_before = {k: v.clone() for k, v in lm.graph_module.state_dict().items() if "lora_" not in k}
    lora_before = {k: p.detach().clone() for k, p in lm.named_lora_parameters()}
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in lm.lora_parameters()}
    for _ in range(3):
        loss = lm(x).last_hidden_state.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in lm.graph_module.state_dict().items():
        if k in base_before:
            assert torch.equal(v, base_before[k]), k
    changed = [k for k, p in lm.named_lora_parameters() if not torch.equal(p, lora_before[k])]
    assert sorted(changed) == sorted(lora_before)  # every A and B moved (B from zero)


def test_transposed_weight_siblings_fuse_like_linear_ones():
    x = torch.randn(4, 3, 8)
    lm = graphlora.transform(TransposedWeights(), [LoraRule(".*", rank=2, alpha=2.0)], (x,))
    _randomize_lora(lm)
    targets = _targets(lm._executable())
    # wq and wk read x: one sibling group (one lora_linear over both where it pays); wo its own
    assert targets.count(sibling_lora_linears) == 1 and targets.count(FUSED_SITE) == 1
    assert aten.matmul.default not in targets
    assert {s.spec.kind for s in graphlora.sites.tagged_sites(lm.graph_module)} == {"matmul"}
    _assert_fused_matches_canonical(lm, x)


def test_transposed_weight_siblings_without_lora_become_one_gemm():
    x = torch.randn(4, 3, 8)
    lm = graphlora.transform(TransposedWeights(), [LoraRule("wo", rank=2, alpha=2.0)], (x,))
    _randomize_lora(lm)
    targets = _targets(lm._executable())
    assert targets.count(sibling_linears) == 1 and targets.count(FUSED_SITE) == 1
    assert aten.linear.default not in targets
    _assert_fused_matches_canonical(lm, x)


def test_every_spelling_fuses():
    x = torch.randn(2, 3, 8)
    lm = graphlora.transform(AllSpellings().eval(), [LoraRule(".*", rank=2, alpha=3.0)], (x,))
    _randomize_lora(lm)
    targets = _targets(lm._executable())
    assert targets.count(FUSED_SITE) == 6
    assert not {aten.addmm.default, aten.mm.default, aten.matmul.default, aten.linear.default} & set(targets)
    _assert_fused_matches_canonical(lm, x)


def test_packed_int4_conv1d_base_fuses_and_reads_its_codes():
    x = ids(3, 9)
    rules = [LoraRule(GPT2_TARGETS, rank=2, alpha=3.0, weight_qtype="int4", group_size=16)]
    lm = graphlora.transform(tiny_gpt2(), rules, (x,), {"use_cache": False})
    _randomize_lora(lm)
    assert "h.0.attn.c_attn.weight" not in dict(lm.graph_module.named_parameters())  # packed codes only
    fused = lm._executable()
    assert _targets(fused).count(FUSED_SITE) == 8
    for node in fused.graph.nodes:
        if node.target is FUSED_SITE:  # the base weight is the (in, out) dequantized codes, transposed
            weight = node.args[1]
            assert weight.target == aten.t.default and graphlora.meta.role(weight.args[0]) == "dequant"
    _assert_fused_matches_canonical(lm, x)
    with torch.no_grad(), lm.disable_adapter():  # and the fused base is the quantized base
        fused_base = lm(x).last_hidden_state
        with canonical_execution(lm):
            torch.testing.assert_close(fused_base, lm(x).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_packed_int4_transposed_weight_fuses():
    x = torch.randn(2, 3, 8)
    rules = [LoraRule(".*", rank=2, alpha=3.0, weight_qtype="int4", group_size=4)]
    lm = graphlora.transform(AllSpellings().eval(), rules, (x,))
    _randomize_lora(lm)
    assert _targets(lm._executable()).count(FUSED_SITE) == 6
    _assert_fused_matches_canonical(lm, x)


def test_lora_linear_keeps_a_transposed_weight_transposed():
    """A Conv1D site reaches lora_linear as ``P.t()`` of an (in, out) parameter: the op checks
    pass for it, and with B = 0 it computes bit for bit what the model's ``addmm`` did."""
    p, b = torch.randn(6, 4), torch.randn(4)  # (in, out), as Conv1D stores it
    x = torch.randn(5, 6, requires_grad=True)
    a = torch.randn(3, 6, requires_grad=True)
    bb = torch.randn(4, 3, requires_grad=True)
    torch.library.opcheck(LORA_LINEAR, (x, p.t(), b, a, bb, 0.5))
    y = LORA_LINEAR(x, p.t(), b, a, bb, 0.5)
    torch.testing.assert_close(y, torch.addmm(b, x, p) + 0.5 * (x @ a.T) @ bb.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(LORA_LINEAR(x, p.t(), b, a, torch.zeros(4, 3), 0.5), torch.addmm(b, x, p))


def _closed_forms(rows: int, in_f: int, out_f: int, rank: int):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, in_f, generator=g)
    w, b = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g)
    a, bb = torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)
    branch = torch.nn.functional.linear(x, w, b) + 0.5 * ((x @ a.T) @ bb.T)  # the canonical graph's ops
    effective = torch.nn.functional.linear(x, torch.addmm(w, bb, a, alpha=0.5), b)  # one GEMM
    return (x, w, b, a, bb), branch, effective


def test_a_fused_site_runs_the_branch_for_few_tokens_and_one_gemm_for_many():
    """One token through a 64 x 64 site: what the canonical ops compute, bit for bit; 4096
    tokens: the effective-weight GEMM, bit for bit; ``always`` forces the GEMM."""
    args, branch, effective = _closed_forms(1, 64, 64, 4)
    assert torch.equal(FUSED_SITE(*args, 0.5), branch)
    assert torch.equal(FUSED_SITE(*args, 0.5, True), effective)
    args, branch, effective = _closed_forms(4096, 64, 64, 4)
    assert torch.equal(FUSED_SITE(*args, 0.5), effective)
    torch.testing.assert_close(effective, branch, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 4096])
def test_fused_site_gradients_in_both_forms_equal_autograd(rows):
    (x, w, b, a, bb), _, _ = _closed_forms(rows, 64, 48, 4)
    leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    FUSED_SITE(leaves[0], w, b, leaves[1], leaves[2], 0.5).pow(2).sum().backward()
    refs = [t.clone().requires_grad_() for t in (x, a, bb)]
    y = torch.nn.functional.linear(refs[0], w, b) + 0.5 * ((refs[0] @ refs[1].T) @ refs[2].T)
    y.pow(2).sum().backward()
    for got, ref in zip(leaves, refs):
        _assert_close_to_scale(got.grad, ref.grad, 1e-5, f"rows={rows}")


def test_sibling_groups_concatenate_only_when_the_tokens_pay_for_it():
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(n, 64, generator=g) for n in (64, 16, 16)]
    biases = [torch.randn(n, generator=g) for n in (64, 16, 16)]
    for rows in (1, 8192):
        x = torch.randn(rows, 64, generator=g)
        one_by_one = [torch.nn.functional.linear(x, w, b) for w, b in zip(weights, biases)]
        concatenated = torch.nn.functional.linear(x, torch.cat(weights), torch.cat(biases)).split([64, 16, 16], -1)
        expected = one_by_one if rows == 1 else concatenated
        for got, ref in zip(sibling_linears(x, weights, biases), expected):
            assert torch.equal(got, ref), rows
        for got, ref in zip(sibling_linears(x, weights, biases, always=True), concatenated):
            assert torch.equal(got, ref), rows
