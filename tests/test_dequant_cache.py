"""``LoraModel.cache_dequantized_weights``: inference reads each quantized weight dequantized once.

The reference is transformers' own model carrying the weights the quantized base computes with
(``base_state_dict``, checked against independent quantizers in test_qlora.py) plus each LoRA
delta ``s B A`` written out here; the switch must not change a training step or a gradient.
"""

import copy

import pytest
import torch

import graphlora
from graphlora import LoraRule, QuantRule
from toy_models import ids, tiny_llama

SCALE = 8.0 / 4


def _qlora(qtype: str, lora_on_mlp: bool = True):
    torch.manual_seed(0)
    base = tiny_llama()
    lora = r".*\.(q|k|v|o|gate|up|down)_proj" if lora_on_mlp else r".*\.(q|v)_proj"
    rules = [LoraRule(lora, rank=4, alpha=8.0, weight_qtype=qtype, group_size=16 if qtype != "int8" else None),
             QuantRule(r".*_proj", weight_qtype=qtype, group_size=16 if qtype != "int8" else None)]
    lm = graphlora.transform(base, rules, (ids(1, 8, vocab=128),), progress=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lm.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return base, lm.eval()


def _reference(base, lm):
    """transformers with the quantized base's float weights and the LoRA deltas merged by hand."""
    ref = copy.deepcopy(base)
    state = lm.base_state_dict()
    lora = lm.lora_state_dict()
    for key in list(state):
        path = key[: -len(".weight")]
        a, b = lora.get(f"{path}.lora_A.weight"), lora.get(f"{path}.lora_B.weight")
        if a is not None:
            state[key] = state[key] + SCALE * (b @ a)
    ref.load_state_dict(state, strict=False)
    return ref.eval()


def _inputs():
    wide = ids(4, 14, vocab=128, seed=3)
    return [ids(1, 1, vocab=128), ids(3, 7, vocab=128, seed=2), wide[:, ::2]]  # odd sizes, non-contiguous


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["nf4", "int4", "int8"])
def test_cached_forward_equals_the_merged_reference_and_the_graph(qtype):
    base, lm = _qlora(qtype)
    ref = _reference(base, lm)
    lm.cache_dequantized_weights = True
    for x in _inputs() if qtype == "nf4" else _inputs()[1:2]:
        with torch.no_grad():
            got = lm(x).logits
            torch.testing.assert_close(got, ref(x, use_cache=False).logits, rtol=1e-4, atol=1e-5)
            lm.fused_execution = False  # dequantized once, not merged: bit for bit the graph
            exact = lm(x).logits
            lm.cache_dequantized_weights = False
            assert torch.equal(exact, lm(x).logits)
            lm.cache_dequantized_weights = True
            lm.fused_execution = True


def test_the_cache_follows_lora_updates_and_is_freed_when_switched_off():
    base, lm = _qlora("nf4", lora_on_mlp=False)
    lm.cache_dequantized_weights = True
    x = ids(2, 5, vocab=128)
    with torch.no_grad():
        before = lm(x).logits
        for p in lm.lora_parameters():
            p.mul_(3.0)  # an in-place update, as an optimizer step makes
        after = lm(x).logits
    assert not torch.allclose(before, after)
    with torch.no_grad():
        torch.testing.assert_close(after, _reference(base, lm)(x, use_cache=False).logits, rtol=1e-4, atol=1e-5)
    assert any("merged_for_decoding" in e._executables for e in lm.call_graphs)
    lm.cache_dequantized_weights = False
    assert not any("merged_for_decoding" in e._executables for e in lm.call_graphs)
    assert "_merged_for_decoding" not in lm.__dict__


@pytest.mark.slow
def test_training_and_gradients_never_read_the_cache():
    _, lm = _qlora("nf4")
    x = ids(3, 6, vocab=128)

    def grads():
        lm.zero_grad()
        lm(x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in lm.named_lora_parameters()}

    lm.train()
    plain = grads()
    lm.cache_dequantized_weights = True
    cached = grads()
    assert plain.keys() == cached.keys() and all(torch.equal(plain[k], cached[k]) for k in plain)
    lm.eval()  # eval with gradients enabled: the graph, not the cache
    with torch.enable_grad():
        out = lm(x).logits
    assert out.requires_grad
    assert not any("merged_for_decoding" in e._executables for e in lm.call_graphs)


@pytest.mark.slow
def test_generate_with_the_cache_gives_the_same_tokens():
    _, lm = _qlora("nf4", lora_on_mlp=False)
    prompt = ids(1, 6, vocab=128, seed=5)
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    plain = lm.generate(prompt, **options)
    lm.cache_dequantized_weights = True
    assert torch.equal(lm.generate(prompt, **options), plain)
