"""A LoraModel serves every call of the original model: one graph per call structure, all sharing
one set of tensors (graphlora/call_graphs.py).

Four decoder architectures from configs: GPT-2 (Conv1D, fused c_attn), Llama and Qwen2 (GQA:
fewer key/value heads than heads), Phi-3 (fused qkv_proj). The reference for every call is the
original transformers model with the LoRA delta merged into its weights, called the same way.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn as nn

import graphlora
from graphlora import LoraRule
from toy_models import MLP, canonical_execution, ids

ATOL = 2e-5


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, pad_token_id=0))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(
        num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=96, max_position_embeddings=64, pad_token_id=0))


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(
        num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=96, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=96, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


ARCHS = {
    "gpt2": (_gpt2, r".*c_attn"),  # Conv1D, q/k/v in one weight
    "llama": (_llama, r".*(q|v)_proj"),
    "qwen2": (_qwen2, r".*(q|k|v)_proj"),  # one key/value head for four query heads
    "phi3": (_phi3, r".*qkv_proj"),  # fused q/k/v
}


def _randomize(lm, adapter=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.lora_parameters(adapter):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _merged_original(model, lm):
    """The original transformers model with the LoRA delta merged into its weights."""
    ref = copy.deepcopy(model)
    state = {k: v for k, v in lm.merge().state_dict().items() if not k.startswith("graphlora")}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing), (missing, unexpected)
    ref.eval()
    # a LoraModel call defaults to use_cache=False (no KV cache object in a training graph)
    return lambda *args, **kwargs: ref(*args, **{"use_cache": False, **kwargs})


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    build, targets = ARCHS[request.param]
    torch.manual_seed(0)
    model = build().eval()
    # a batch-1 example, as many users pass: it must not specialise the batch of later calls
    lm = graphlora.transform(model, [LoraRule(targets, rank=4, alpha=8.0)], (ids(1, 6, vocab=96),), record=True)
    _randomize(lm)
    return request.param, model, lm, _merged_original(model, lm)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=ATOL)


def _padded(batch, seq, seed):
    x = ids(batch, seq, vocab=96, seed=seed)
    mask = torch.ones_like(x)
    mask[0, : seq // 2] = 0  # left padding of the first row
    x = x.masked_fill(mask == 0, 0)
    return x, mask


@pytest.mark.slow
def test_every_call_of_the_original_model(arch):
    name, model, lm, ref = arch
    assert inspect.signature(lm.forward) == inspect.signature(model.forward)
    with torch.no_grad():
        # the transform example's call, then other batch and sequence sizes
        for b, s in [(1, 6), (4, 9), (2, 3), (1, 11)]:
            x = ids(b, s, vocab=96, seed=b * s)
            _close(lm(x).logits, ref(x).logits)
        # padding, labels and position ids in one call; then without labels and position ids
        for b, s in [(3, 8), (2, 5)]:
            x, mask = _padded(b, s, seed=s)
            labels = x.masked_fill(mask == 0, -100)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = lm(input_ids=x, attention_mask=mask, labels=labels, position_ids=pos)
            expected = ref(input_ids=x, attention_mask=mask, labels=labels, position_ids=pos)
            _close(out.loss, expected.loss)
            _close(out.logits[mask.bool()], expected.logits[mask.bool()])
            plain = lm(x, attention_mask=mask)
            _close(plain.logits[mask.bool()], ref(x, attention_mask=mask).logits[mask.bool()])
        # hidden states, a tuple, the last logit only
        x, mask = _padded(2, 7, seed=3)
        options = dict(attention_mask=mask, output_hidden_states=True, return_dict=False, logits_to_keep=1)
        out, expected = lm(x, **options), ref(x, **options)
        assert isinstance(out, tuple) and len(out) == len(expected) == 2
        _close(out[0], expected[0])
        assert out[0].shape[1] == 1
        for got, want in zip(out[-1], expected[-1]):
            _close(got[mask.bool()], want[mask.bool()])

    # one graph per call structure, all reading the canonical graph's tensors
    graphs = lm.call_graphs
    assert graphs[0].canonical and len(graphs) <= 5
    canonical = {id(t) for t in list(lm.graph_module.parameters()) + list(lm.graph_module.buffers())}
    for g in graphs[1:]:
        names = [r.name for r in g.pass_log]
        assert names == ["ReplicateSitesPass", "InsertLoraPass[default]", "ReplicateQuantizersPass"], names
        assert all(r.after is not None for r in g.pass_log)  # record=True: diffable
        held = list(g.graph_module.parameters()) + list(g.graph_module.buffers())
        assert all(id(t) in canonical for t in held)


@pytest.mark.slow
def test_training_through_other_call_structures_updates_the_shared_lora_weights():
    torch.manual_seed(0)
    model = _llama().eval()
    lm = graphlora.transform(model, [LoraRule(r".*(q|v)_proj", rank=4)], (ids(2, 6, vocab=96),))
    x = ids(2, 6, vocab=96, seed=1)
    lm.train()
    loss = lm(x, labels=x).loss  # a graph of its own (the canonical one has no labels)
    loss.backward()
    grads = {k: p.grad for k, p in lm.named_lora_parameters()}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for k, g in grads.items() if "lora_B" in k)
    with canonical_execution(lm):
        lm.zero_grad()
        lm.eval()
        # the same computation through the canonical graph gives the same loss
        logits = lm(x).logits
        shifted = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), x[:, 1:].reshape(-1))
        torch.testing.assert_close(shifted, lm(x, labels=x).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_qlora_graphs_of_new_calls_reuse_the_stored_codes():
    torch.manual_seed(0)
    model = _llama().eval()
    rule = LoraRule(r".*_proj", rank=4, weight_qtype="nf4", group_size=32)
    lm = graphlora.transform(model, [rule], (ids(2, 6, vocab=96),))
    _randomize(lm)
    gm = lm.graph_module
    with pytest.raises(AttributeError):
        gm.get_parameter("model.layers.0.self_attn.q_proj.weight")  # the float weight is freed
    x = ids(3, 5, vocab=96, seed=2)
    with torch.no_grad(), canonical_execution(lm):
        plain = lm(x).logits
        with_labels = lm(x, labels=x)
    torch.testing.assert_close(with_labels.logits, plain, rtol=0, atol=1e-6)
    derived = lm.call_graphs[-1].graph_module
    codes = "graphlora_quant.weight.model.layers.0.self_attn.q_proj.weight.packed"
    assert derived.get_buffer(codes) is gm.get_buffer(codes)
    # the derived graph reads the weight through the same dequantize op as the canonical one
    dequant = [n for n in derived.graph.nodes if graphlora.meta.role(n) == "dequant"]
    assert len(dequant) == sum(1 for n in gm.graph.nodes if graphlora.meta.role(n) == "dequant") > 0


def test_non_contiguous_and_batch_one_examples_trace_dynamic_graphs():
    model = MLP().eval()
    x = torch.randn(4, 16)[:1, ::2]  # batch 1 and non-contiguous
    lm = graphlora.transform(model, [LoraRule(r"layers\.0", rank=2)], (x,))
    _randomize(lm)
    with torch.no_grad():
        for batch in (1, 5, 3):
            y = torch.randn(batch, 8)
            torch.testing.assert_close(lm(y), lm.merge()(y), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lm(y.t().contiguous().t()), lm(y), rtol=1e-6, atol=1e-6)
        assert lm(torch.randn(0, 8)).shape == (0, 4)  # an empty batch too
    assert len(lm.call_graphs) == 1  # MLP has no size-1 branch: one graph serves every batch


@pytest.mark.slow
def test_use_cache_defaults_to_false_and_train_eval_flip_every_graph():
    from toy_models import tiny_gpt2

    model = tiny_gpt2()
    lm = graphlora.transform(model, 2, (ids(2, 5),))  # no use_cache in the example
    out = lm(ids(3, 4))
    assert out.past_key_values is None
    lm(ids(3, 4), attention_mask=torch.ones(3, 4, dtype=torch.long))
    assert len(lm.call_graphs) == 2
    lm.train()
    dropout = torch.ops.aten.dropout.default
    for g in lm.call_graphs:
        flags = [n.args[2] for n in g.graph_module.graph.nodes if n.target == dropout]
        assert flags and all(flags)
    lm.eval()
    for g in lm.call_graphs:
        assert not any(n.args[2] for n in g.graph_module.graph.nodes if n.target == dropout)


def test_adapter_switches_rebuild_derived_graphs():
    model = MLP().eval()
    lm = graphlora.transform(model, [LoraRule(r"layers\.(0|2)", rank=2)], (torch.randn(3, 8),))
    lm.add_adapter("b", {"layers.0": graphlora.LoraSpec(rank=2, alpha=4.0)})
    _randomize(lm, "default", seed=1)
    _randomize(lm, "b", seed=2)
    y = torch.randn(2, 8)
    for name in ("b", "default"):
        lm.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(lm.graph_for(y)(y), lm.merge()(y), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- mixed-adapter batches


def _two_adapters(lm):
    lm.add_adapter("other", {s.module_path: graphlora.LoraSpec(rank=3, alpha=6.0) for s in lm.sites})
    _randomize(lm, "default", seed=3)
    _randomize(lm, "other", seed=4)


def _row_by_row(lm, x, names, **kwargs):
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with lm.disable_adapter():
                rows.append(lm(x[i : i + 1], **{k: v[i : i + 1] for k, v in kwargs.items()}))
        else:
            lm.set_adapter(name)
            rows.append(lm(x[i : i + 1], **{k: v[i : i + 1] for k, v in kwargs.items()}))
    lm.set_adapter("default")
    return rows


def test_mixed_adapter_batch_equals_each_row_with_its_adapter():
    lm = graphlora.transform(MLP().eval(), [LoraRule(r"layers\.(0|2)", rank=2)], (torch.randn(3, 8),))
    _two_adapters(lm)
    x = torch.randn(4, 8)
    names = ["other", "default", "__base__", "other"]
    with torch.no_grad():
        mixed = lm(x, adapter_names=names)
        rows = _row_by_row(lm, x, names)
    torch.testing.assert_close(mixed, torch.cat(rows), rtol=1e-5, atol=1e-6)
    assert lm.active_adapters == ["default"]
    with pytest.raises(graphlora.AdapterError, match="unknown adapter"):
        lm(x, adapter_names=["nope"] * 4)
    with pytest.raises(graphlora.InputError, match="4 rows"):
        lm(x, adapter_names=["other"])


@pytest.mark.slow
def test_mixed_adapter_batch_on_a_decoder():
    torch.manual_seed(0)
    model = _llama().eval()
    lm = graphlora.transform(model, [LoraRule(r".*(q|v)_proj", rank=4)], (ids(2, 6, vocab=96),))
    _two_adapters(lm)
    x, mask = _padded(3, 7, seed=5)
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        mixed = lm(x, attention_mask=mask, adapter_names=names).logits
        rows = [r.logits for r in _row_by_row(lm, x, names, attention_mask=mask)]
    for i in range(3):
        keep = mask[i].bool()
        torch.testing.assert_close(mixed[i][keep], rows[i][0][keep], rtol=1e-4, atol=ATOL)
    gated = [g for g in lm.call_graphs if g.adapters is not None]
    assert len(gated) == 1 and gated[0].adapters == ("default", "other")
    gated = gated[0]
    assert [r.name for r in gated.pass_log][1:3] == ["InsertLoraPass[default]", "InsertLoraPass[other]"]


@pytest.mark.slow
def test_calibrated_quantizers_are_shared_by_every_graph():
    from toy_models import tiny_bert

    rules = [LoraRule(r".*attention\.self\.(query|value)", rank=2, act_qtype="int8", lora_act_qtype="int8")]
    lm = graphlora.transform(tiny_bert(), rules, (ids(2, 8),))
    reference = graphlora.transform(tiny_bert(), rules, (ids(2, 8),))
    _randomize(lm)
    reference.load_state_dict(lm.state_dict())
    batches = [ids(2, 8, seed=i) for i in range(3)]
    zeros = torch.zeros(2, 8, dtype=torch.long)
    # calibrating through another call structure feeds the canonical graph's observers
    got = graphlora.calibrate(lm, [{"input_ids": b, "token_type_ids": zeros} for b in batches], progress=False)
    want = graphlora.calibrate(reference, [(b,) for b in batches], progress=False)
    assert sorted(got) == sorted(want) and got
    for name in want:
        torch.testing.assert_close(got[name].scale, want[name].scale, rtol=0, atol=0)
    # and the derived graph runs the canonical graph's fake-quant nodes, on the same scales
    x = ids(3, 6, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(lm(x, token_type_ids=torch.zeros_like(x)).last_hidden_state,
                                   lm(x).last_hidden_state, rtol=1e-5, atol=1e-5)
    derived = [g for g in lm.call_graphs if not g.canonical][-1]
    assert derived.pass_log[-1].name == "ReplicateQuantizersPass"
    fq = [n for n in derived.graph_module.graph.nodes if graphlora.meta.role(n) == "fake_quant"]
    assert len(fq) == sum(1 for n in lm.graph_module.graph.nodes if graphlora.meta.role(n) == "fake_quant") > 0
