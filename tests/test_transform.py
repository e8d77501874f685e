"""LoRA branches: exact at init, the closed form with random weights, merge, training."""

import copy
import math

import pytest
import torch
import torch.nn as nn

import graphlora
from graphlora import LoraRule
from toy_models import AllSpellings, MLP, SharedWeight, ids, tiny_bert, tiny_gpt2, tiny_llama


def _randomize_lora(lm, std=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def _closed_form_reference(model, lm):
    """An independent computation: the original model with W replaced by W + scale * B @ A.

    Uses the original nn.Module (not the graph) and PEFT's formula; for (in, out) weights
    (Conv1D / fan_in_fan_out) the delta is transposed, as PEFT does.
    """
    ref = copy.deepcopy(model)
    specs = lm.adapters["default"]
    lora = dict(lm.named_lora_parameters())
    layouts = {s.module_path: s for s in lm.sites}
    with torch.no_grad():
        for path, spec in specs.items():
            a = lora[f"{path}.lora_A.weight"]
            b = lora[f"{path}.lora_B.weight"]
            delta = (b @ a) * (spec.alpha / spec.rank)
            site = layouts[path]
            name = site.weight_name
            owner = ref.get_submodule(name.rpartition(".")[0]) if "." in name else ref
            w = getattr(owner, name.rpartition(".")[2])
            w.add_(delta.t() if site.fan_in_fan_out else delta)
    return ref


CASES = {
    "spellings": (lambda: AllSpellings().eval(), lambda: ((torch.randn(2, 3, 8),), {}), [LoraRule(".*", rank=2, alpha=3.0)]),
    "bert": (tiny_bert, lambda: ((ids(),), {}), [LoraRule(r".*(query|key|value|dense)", rank=4, alpha=8.0)]),
    "llama": (tiny_llama, lambda: ((ids(vocab=128),), {"use_cache": False}), [LoraRule(r".*_proj", rank=4, alpha=16.0)]),
    "gpt2": (tiny_gpt2, lambda: ((ids(),), {"use_cache": False}), [LoraRule(r".*c_(attn|proj|fc)", rank=4, alpha=4.0)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fresh_lora_is_exact_then_closed_form_then_merge(case):
    build, inputs, rules = CASES[case]
    model = build()
    args, kwargs = inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm = graphlora.transform(model, rules, args, kwargs)
    expected = _first_tensor(model(*args, **kwargs))
    # B = 0 at init: bit-identical to the original model
    assert torch.equal(_first_tensor(lm(*args, **kwargs)), expected)

    _randomize_lora(lm)
    got = _first_tensor(lm(*args, **kwargs))
    ref = _first_tensor(_closed_form_reference(model, lm)(*args, **kwargs))
    assert not torch.allclose(got, expected, atol=1e-3)  # the adapters do something
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)

    merged = lm.merge()
    torch.testing.assert_close(_first_tensor(merged(*args, **kwargs)), got, rtol=1e-4, atol=1e-5)
    assert not any("graphlora_adapters" in n for n, _ in merged.named_parameters())
    # the original model was never touched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())


def test_shared_weight_gets_one_pair_at_each_use_and_tied_head_stays_tied():
    m = SharedWeight().eval()
    x = ids(2, 5, vocab=20)
    lm = graphlora.transform(m, [LoraRule("block|head", rank=2)], (x,))
    names = sorted(n for n, _ in lm.named_lora_parameters())
    assert names == ["block.lora_A.weight", "block.lora_B.weight", "head.lora_A.weight", "head.lora_B.weight"]
    _randomize_lora(lm)
    lora = dict(lm.named_lora_parameters())
    # independent computation: the delta applies at both uses of block, and to head but not embed
    with torch.no_grad():
        d_block = lora["block.lora_B.weight"] @ lora["block.lora_A.weight"]
        d_head = lora["head.lora_B.weight"] @ lora["head.lora_A.weight"]
        h = m.embed(x)
        h = torch.relu(h @ (m.block.weight + d_block).T + m.block.bias)
        h = h @ (m.block.weight + d_block).T + m.block.bias
        expected = h @ (m.head.weight + d_head).T
    torch.testing.assert_close(lm(x), expected, rtol=1e-5, atol=1e-6)
    merged = lm.merge()
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-6)
    # the embedding still reads the original (tied) weight
    torch.testing.assert_close(merged.embed.weight, m.embed.weight)


def test_gaussian_init_and_rslora_scale():
    lm = graphlora.transform(MLP(dims=(256, 256, 4)), [LoraRule(r"layers\.0", rank=64, alpha=16.0, init="gaussian", use_rslora=True)], (torch.randn(2, 256),))
    a = dict(lm.named_lora_parameters())["layers.0.lora_A.weight"]
    assert abs(a.std().item() - 1 / 64) < 0.1 / 64  # PEFT's gaussian init: std 1/rank
    assert lm.adapters["default"]["layers.0"].scale == pytest.approx(16.0 / math.sqrt(64))


def test_kaiming_uniform_bound():
    lm = graphlora.transform(MLP(dims=(100, 50, 4)), [LoraRule(r"layers\.0", rank=16)], (torch.randn(2, 100),))
    a = dict(lm.named_lora_parameters())["layers.0.lora_A.weight"]
    assert a.abs().max() <= 1 / math.sqrt(100) + 1e-7  # kaiming_uniform(a=sqrt(5)) bound
    assert a.abs().max() > 0.8 / math.sqrt(100)


def test_training_lowers_loss_and_base_stays_bit_identical():
    torch.manual_seed(0)
    model = MLP(dims=(8, 32, 32, 4))
    x = torch.randn(64, 8)
    target = torch.randn(64, 4)
    lm = graphlora.transform(model, [LoraRule(".*", rank=4)], (x,))
    base_before = {k: v.clone() for k, v in lm.graph_module.state_dict().items() if "graphlora" not in k}
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    lm.train()
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(lm(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    for k, v in lm.graph_module.state_dict().items():
        if k in base_before:
            assert torch.equal(v, base_before[k]), k


def test_train_eval_switch_dropout_in_exported_graph():
    model = MLP(dims=(16, 64, 64, 4), dropout=0.5)
    x = torch.randn(8, 16)
    lm = graphlora.transform(model, [LoraRule(".*", rank=4, dropout=0.3)], (x,))
    assert lm.training  # starts in the mode the model was in (a fresh module trains)
    lm.eval()
    torch.testing.assert_close(lm(x), lm(x))
    lm.train()
    assert lm.training and lm.graph_module.training
    assert not torch.allclose(lm(x), lm(x))
    flags = [n.args[2] for n in lm.graph_module.graph.nodes if n.target == torch.ops.aten.dropout.default]
    assert flags and all(flags)  # base dropout and LoRA dropout both follow the mode
    lm.eval()
    torch.testing.assert_close(lm(x), lm(x))
    torch.testing.assert_close(lm(x), model.eval()(x))


def test_dynamic_batch_and_sequence():
    model = tiny_bert()
    lm = graphlora.transform(model, 4, (ids(2, 8),))
    for shape in [(3, 5), (7, 33)]:
        x = ids(*shape)
        torch.testing.assert_close(lm(x).last_hidden_state, model(x).last_hidden_state)


def test_meta_device_model_traces_without_allocating():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    lm = graphlora.transform(model, [LoraRule(r".*_proj", rank=8)], (torch.zeros(1, 8, dtype=torch.long, device="meta"),), {"use_cache": False})
    assert len(lm.sites) == 14
    assert all(p.device.type == "meta" for p in lm.parameters())


def test_symbolic_method_matches_export():
    model = AllSpellings().eval()
    x = torch.randn(2, 3, 8)
    rules = [LoraRule(".*", rank=2)]
    torch.manual_seed(3)
    a = graphlora.transform(model, rules, (x,), method="export")
    torch.manual_seed(3)
    b = graphlora.transform(model, rules, (x,), method="symbolic")
    assert {s.module_path for s in a.sites} == {s.module_path for s in b.sites}
    b.load_lora_state_dict(a.lora_state_dict())
    _randomize_lora(a)
    b.load_lora_state_dict(a.lora_state_dict())
    torch.testing.assert_close(a(x), b(x))


def test_torch_compile():
    model = MLP()
    x = torch.randn(4, 8)
    lm = graphlora.transform(model, [LoraRule(".*", rank=2)], (x,))
    _randomize_lora(lm)
    compiled = torch.compile(lm, backend="aot_eager")
    torch.testing.assert_close(compiled(x), lm(x))
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in lm.lora_parameters())


def test_print_trainable_parameters(capsys):
    lm = graphlora.transform(MLP(dims=(8, 32, 4)), [LoraRule(".*", rank=2)], (torch.randn(2, 8),))
    lm.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    base = 8 * 32 + 32 + 32 * 4 + 4
    lora = 2 * (8 + 32) + 2 * (32 + 4)
    assert line == f"trainable params: {lora:,d} || all params: {base + lora:,d} || trainable%: {100 * lora / (base + lora):.4f}"


def test_lora_state_dict_round_trip_and_errors():
    x = torch.randn(2, 8)
    a = graphlora.transform(MLP(), [LoraRule(".*", rank=2)], (x,))
    _randomize_lora(a)
    b = graphlora.transform(MLP(), [LoraRule(".*", rank=2)], (x,))
    b.load_lora_state_dict({"base_model.model." + k: v for k, v in a.lora_state_dict().items()})
    for k, v in a.lora_state_dict().items():
        assert torch.equal(v, b.lora_state_dict()[k])
    sd = a.lora_state_dict()
    sd["layers.0.lora_A.weight"] = torch.zeros(3, 8)
    with pytest.raises(graphlora.AdapterError, match=r"layers.0.lora_A.weight: expected \(2, 8\), got \(3, 8\)"):
        b.load_lora_state_dict(sd)
    with pytest.raises(graphlora.AdapterError, match="missing keys"):
        b.load_lora_state_dict({})


def test_multiple_adapters_switch_and_disable():
    x = torch.randn(4, 8)
    model = MLP()
    lm = graphlora.transform(model, [LoraRule(".*", rank=2)], (x,))
    _randomize_lora(lm, seed=1)
    out_default = lm(x)
    lm.add_adapter("other", {"layers.0": graphlora.LoraSpec(rank=3, alpha=3.0)})
    assert lm.active_adapters == ["default"]
    torch.testing.assert_close(lm(x), out_default)
    lm.set_adapter("other")
    assert torch.equal(lm(x), model(x))  # fresh adapter: B = 0
    assert all(p.requires_grad for p in lm.lora_parameters("other"))
    assert not any(p.requires_grad for p in lm.lora_parameters("default"))
    with lm.disable_adapter():
        assert torch.equal(lm(x), model(x))
    lm.set_adapter("default")
    torch.testing.assert_close(lm(x), out_default)
    lm.disable_adapters()
    assert torch.equal(lm(x), model(x))
    assert not any(graphlora.meta.role(n) == "lora_add" for n in lm.graph_module.graph.nodes)
    with pytest.raises(graphlora.AdapterError, match="unknown adapter 'nope'"):
        lm.set_adapter("nope")
    with pytest.raises(graphlora.AdapterError, match="not sites of this model"):
        lm.add_adapter("bad", {"nowhere": graphlora.LoraSpec(rank=1, alpha=1.0)})


def test_execution_fusions_match_the_canonical_graph_with_gradients():
    model = tiny_bert()
    x = ids(3, 9)
    lm = graphlora.transform(model, [LoraRule(r".*(query|key|value|output\.dense)", rank=2, alpha=3.0)], (x,))
    _randomize_lora(lm)
    fused = lm._executable()
    targets = [n.target for n in fused.graph.nodes]
    # per layer: q/k/v + their LoRA branches become one sibling group (one lora_linear GEMM
    # where the tokens pay for it); each output.dense site becomes a lora_linear of its own
    from graphlora.passes.fuse_lora import lora_linear_or_branch
    from graphlora.passes.fuse_siblings import sibling_lora_linears

    assert targets.count(sibling_lora_linears) == 2
    assert targets.count(lora_linear_or_branch) == 2 * 2
    # the canonical graph is untouched: separate sites and branches
    assert sum(1 for n in lm.graph_module.graph.nodes if graphlora.meta.role(n) == "lora_add") == 10
    out = lm(x).last_hidden_state
    out.pow(2).sum().backward()
    grads = {k: p.grad.clone() for k, p in lm.named_lora_parameters()}
    lm.zero_grad()
    lm.fused_execution = False
    ref = lm(x).last_hidden_state
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for k, p in lm.named_lora_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6)
    assert not any(k.startswith("_fused") for k in lm.state_dict())


def test_lora_linear_op_checks():
    from graphlora.passes import fuse_lora  # noqa: F401

    x = torch.randn(2, 5, 6, requires_grad=True)
    w, b = torch.randn(4, 6), torch.randn(4)
    a = torch.randn(3, 6, requires_grad=True)
    bb = torch.randn(4, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.graphlora.lora_linear.default, (x, w, b, a, bb, 0.5))
    y = torch.ops.graphlora.lora_linear(x, w, b, a, bb, 0.5)
    ref = torch.nn.functional.linear(x, w, b) + 0.5 * (x @ a.T) @ bb.T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_merged_model_is_called_like_the_original():
    """merge() of a causal LM traced with use_cache=False: called like the original model (the
    traced constant may be left out, passed again, arguments by position or by name); a call
    the graph cannot serve names the argument."""
    model = tiny_llama(layers=1)
    x = ids(vocab=128)
    lm = graphlora.transform(model, [LoraRule(r".*q_proj", rank=4)], (x,), {"use_cache": False})
    _randomize_lora(lm)
    merged = lm.merge()
    with torch.no_grad():
        expected = lm(x).logits
        for out in (merged(x), merged(input_ids=x), merged(x, use_cache=False)):
            torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(graphlora.InputError, match="use_cache=True differs"):
        merged(x, use_cache=True)
    with pytest.raises(graphlora.InputError, match="labels"):
        merged(x, labels=x)
