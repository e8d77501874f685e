"""``LoraModel.generate``: transformers' generation API over graphs with a static KV cache
(graphlora/generation.py, graphlora/kv_cache.py).

The reference is transformers' own ``generate()`` on the original architecture holding the merged
weights (``save_pretrained(save_adapters_separately=False)`` loaded by ``from_pretrained``: for
an NF4 base, the dequantized weights plus the LoRA delta), run with transformers' default cache.
Models come from configs with random weights and LoRA factors made non-zero, so an adapter
changes the tokens.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import graphlora
from graphlora import LoraRule

pytestmark = pytest.mark.slow  # every test traces a prefill and a decode graph (seconds each)


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, pad_token_id=0)


def _llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_llama_config()).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


def _randomize(lm, adapter=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.lora_parameters(adapter):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _transform(base, pattern, **rule):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = graphlora.transform(base, [LoraRule(pattern, rank=4, alpha=8.0, **rule)],
                                 (torch.zeros(1, 8, dtype=torch.long),))
    _randomize(lm)
    return lm.eval()


def _merged(lm, tmp_path, name="merged"):
    """The original architecture with the LoRA delta merged in, loaded by transformers."""
    lm.save_pretrained(tmp_path / name, save_adapters_separately=False)
    cls = type(lm.__dict__["_template"])
    return cls.from_pretrained(tmp_path / name).eval()


def _prompts(rows=2, length=6, pad=(3,)):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 96, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pad):
        mask[row, :n] = 0  # left padding
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    lm = _transform(_llama(), r".*(q|v)_proj")
    return lm, _merged(lm, tmp_path_factory.mktemp("llama"))


def test_greedy_tokens_equal_transformers_on_the_merged_llama(llama):
    lm, ref = llama
    ids, mask = _prompts()
    ours = lm.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert ours.shape == (2, 14)
    assert torch.equal(ours, theirs)
    with lm.disable_adapter():  # the adapter is applied: the base model generates other tokens
        assert not torch.equal(lm.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), ours)


def test_other_sizes_reuse_the_prefill_and_decode_graphs(llama):
    lm, ref = llama
    ids, mask = _prompts()
    lm.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    graphs = len(lm.call_graphs)
    ids, mask = _prompts(rows=3, length=9, pad=(0, 4))
    ours = lm.generate(ids, attention_mask=mask, max_new_tokens=11, do_sample=False)
    assert torch.equal(ours, ref.generate(ids, attention_mask=mask, max_new_tokens=11, do_sample=False))
    assert len(lm.call_graphs) == graphs  # batch, prompt and cache lengths are dynamic


def test_each_new_token_runs_the_decode_graph_on_one_token(llama):
    lm, _ = llama
    ids, mask = _prompts()
    calls = []
    dispatch = lm._calls.dispatch

    def spy(args, kwargs):
        entry, call_args, call_kwargs, finish = dispatch(args, kwargs)
        calls.append((entry, tuple(call_kwargs["input_ids"].shape), call_kwargs["past_key_values"]))
        return entry, call_args, call_kwargs, finish

    lm._calls.dispatch = spy
    try:
        lm.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    finally:
        del lm._calls.dispatch
    assert [shape for _, shape, _ in calls] == [(2, 6)] + [(2, 1)] * 5  # the prompt once, then one token each
    prefill, decode = calls[0][0], calls[1][0]
    assert prefill is not decode and all(entry is decode for entry, _, _ in calls[1:])
    keys = calls[0][2][0][0]
    assert all(state[0][0] is keys for _, _, state in calls)  # one cache, updated in place
    assert "input_ids=<int64[2x1]>" in decode.call
    # in eval mode both run with the adapter merged into the weights: one merged copy, shared
    runs = [dict(e._executables["merged_for_decoding"][-1].state_dict(keep_vars=True)) for e in (prefill, decode)]
    own = {id(t) for t in decode.graph_module.state_dict(keep_vars=True).values()}
    merged = {n: t for n, t in runs[1].items() if id(t) not in own}
    assert len(merged) == 4 and all(runs[0][n] is t for n, t in merged.items())  # q_proj, v_proj of 2 layers


def test_eos_stops_generation_as_in_transformers(llama):
    lm, ref = llama
    ids, mask = _prompts()
    free = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    eos = int(free[0, 6 + 2])  # row 0's third new token
    ours = lm.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                          pad_token_id=0)
    assert torch.equal(ours, theirs)
    first = int((ours[0, 6:] == eos).nonzero()[0, 0])
    assert (ours[0, 6 + first + 1:] == 0).all()  # row 0 stopped at its first eos: padding after it
    if not (ours[1, 6:] == eos).any():
        assert ours.shape[1] == 14  # row 1 never met eos: generation ran to max_new_tokens


def test_sampling_with_a_seed_is_reproducible_and_matches_transformers(llama):
    from transformers import GenerationConfig

    lm, ref = llama
    ids, mask = _prompts()
    config = GenerationConfig(do_sample=True, max_new_tokens=8, top_k=20, temperature=0.9, pad_token_id=0)
    runs = []
    for model in (lm, lm, ref):
        torch.manual_seed(123)
        runs.append(model.generate(ids, attention_mask=mask, generation_config=config))
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[2])
    torch.manual_seed(124)
    assert not torch.equal(lm.generate(ids, attention_mask=mask, generation_config=config), runs[0])


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=4, vocab_size=96, max_position_embeddings=64, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2)).eval()


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_conv1d_and_fused_qkv_greedy_tokens_equal_transformers(arch, tmp_path):
    make, pattern = {"gpt2": (_gpt2, r".*c_attn"), "phi3": (_phi3, r".*qkv_proj")}[arch]  # Conv1D; fused q/k/v
    lm = _transform(make(), pattern)
    ref = _merged(lm, tmp_path)
    ids, mask = _prompts()
    ours = lm.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
    _randomize(lm, seed=5)  # new LoRA weights (as training makes): the next generate uses them
    changed = lm.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    ref = _merged(lm, tmp_path, "changed")
    assert torch.equal(changed, ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
    assert not torch.equal(changed, ours)


def test_nf4_base_greedy_tokens_equal_the_dequantized_merged_model(tmp_path):
    lm = _transform(_llama(), r".*_proj", weight_qtype="nf4", group_size=32)
    ref = _merged(lm, tmp_path)
    ids, mask = _prompts()
    ours = lm.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))


def test_two_adapters_in_one_batch(tmp_path):
    from graphlora import LoraSpec

    lm = _transform(_llama(), r".*(q|v)_proj")
    lm.add_adapter("other", {s.module_path: LoraSpec(rank=4, alpha=8.0) for s in lm.sites})
    _randomize(lm, "other", seed=2)
    refs = {"default": _merged(lm, tmp_path, "a"), "__base__": _llama()}
    lm.set_adapter("other")
    refs["other"] = _merged(lm, tmp_path, "b")
    lm.set_adapter("default")
    ids, mask = _prompts(rows=3, pad=())
    names = ["other", "default", "__base__"]
    ours = lm.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, adapter_names=names)
    for row, name in enumerate(names):  # each row as its adapter's merged model generates it alone
        theirs = refs[name].generate(ids[row:row + 1], attention_mask=mask[row:row + 1], max_new_tokens=6,
                                     do_sample=False)
        assert torch.equal(ours[row:row + 1], theirs), name
    assert not torch.equal(ours[0], ours[1])


def test_a_growing_cache_is_refused_naming_the_static_one(llama):
    from transformers import DynamicCache, StaticCache

    lm, _ = llama
    ids, _ = _prompts(pad=())
    with pytest.raises(graphlora.InputError, match="StaticCache"):
        lm(ids, past_key_values=DynamicCache(config=lm.config), use_cache=True)
    sliding = copy.copy(lm.config)
    sliding.sliding_window, sliding.layer_types = 4, ["sliding_attention"] * sliding.num_hidden_layers
    with pytest.raises(graphlora.InputError, match="sliding-window"):
        lm(ids, past_key_values=StaticCache(config=sliding, max_cache_len=16), use_cache=True)
    with pytest.raises(graphlora.InputError, match="adapter_names"):
        lm.generate(ids, max_new_tokens=2, adapter_names="default")


def test_generate_needs_a_model_that_can_generate():
    from toy_models import MLP

    lm = graphlora.transform(MLP(), [LoraRule(r"layers\.0", rank=2)], (torch.zeros(2, 8),))
    assert not lm.can_generate()
    with pytest.raises(graphlora.InputError, match="can generate"):
        lm.generate(torch.zeros(2, 8))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                            max_position_embeddings=64, pad_token_id=0, sliding_window=4)).eval()


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=96, max_position_embeddings=64,
                          pad_token_id=0, sliding_window=4)
    assert config.layer_types == ["sliding_attention", "full_attention"]  # one layer of each kind
    return Gemma2ForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_models_generate_past_the_window_as_transformers(arch, tmp_path):
    """A window of 4 tokens, prompts of 6 and 12 new tokens: every decoded token attends to a
    window that has slid; the reference runs transformers' own sliding-window cache."""
    lm = _transform({"mistral": _mistral, "gemma2": _gemma2}[arch](), r".*(q|v)_proj")
    ref = _merged(lm, tmp_path)
    ids, mask = _prompts()
    ours = lm.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, theirs)
    base = {"mistral": _mistral, "gemma2": _gemma2}[arch]()
    base.config.sliding_window = 64  # the window matters: without it the tokens differ
    with torch.no_grad():
        for name, p in ref.named_parameters():
            base.get_parameter(name).copy_(p)
    assert not torch.equal(base.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False), theirs)


def test_beam_search_with_several_sequences_and_two_adapters(tmp_path):
    """Beams and ``num_return_sequences`` repeat each prompt's row (its adapter name too) and
    reorder the static cache between steps: each prompt's 2 returned beams equal its adapter's
    merged model searching alone."""
    from graphlora import LoraSpec

    lm = _transform(_llama(), r".*(q|v)_proj")
    lm.add_adapter("other", {s.module_path: LoraSpec(rank=4, alpha=8.0) for s in lm.sites})
    _randomize(lm, "other", seed=2)
    lm.set_adapter("other")
    refs = {"other": _merged(lm, tmp_path, "other")}
    lm.set_adapter("default")
    refs["default"] = _merged(lm, tmp_path, "default")
    ids, mask = _prompts()
    search = dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=2)
    names = ["other", "default"]
    ours = lm.generate(ids, attention_mask=mask, adapter_names=names, **search)
    assert ours.shape == (4, ids.shape[1] + 6)
    for row, name in enumerate(names):
        theirs = refs[name].generate(ids[row:row + 1], attention_mask=mask[row:row + 1], **search)
        assert torch.equal(ours[2 * row:2 * row + 2], theirs), name
