"""Activation checkpointing: each transformer block of the graph recomputed in backward
(graphlora/activation_checkpointing.py), with the gradients of a run without it."""

from __future__ import annotations

import pytest
import torch

import graphlora
from graphlora import LoraRule
from toy_models import ids


def _llama(layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, attention_dropout=0.1)).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=64)).eval()


def _step(lm, x, mask):
    """One training step's loss and LoRA gradients, and the bytes autograd saved for backward."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes() if t.device.type != "meta" else 0)
        return t

    lm.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # dropout draws the same masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm(x, attention_mask=mask, labels=x).loss
    loss.backward()
    grads = {k: p.grad.clone() for k, p in lm.named_lora_parameters()}
    return loss.detach(), grads, sum(saved)


@pytest.mark.slow
@pytest.mark.parametrize("build,targets", [(_llama, r".*(q|v)_proj|.*down_proj"), (_gpt2, r".*c_attn|.*c_fc")],
                         ids=["llama", "gpt2"])
def test_checkpointed_gradients_equal_the_plain_ones_and_less_is_saved(build, targets):
    x = ids(4, 24, vocab=96, seed=3)
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    example = {"input_ids": x[:2, :8], "attention_mask": mask[:2, :8], "labels": x[:2, :8]}
    lm = graphlora.transform(build(), [LoraRule(targets, rank=4, dropout=0.1)], (), example)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lm.train()
    loss, grads, saved = _step(lm, x, mask)
    assert not lm.is_gradient_checkpointing
    lm.gradient_checkpointing_enable()
    assert lm.is_gradient_checkpointing and lm.supports_gradient_checkpointing
    loss_ck, grads_ck, saved_ck = _step(lm, x, mask)
    torch.testing.assert_close(loss_ck, loss, rtol=0, atol=0)
    for k in grads:
        torch.testing.assert_close(grads_ck[k], grads[k], rtol=1e-6, atol=1e-7)
    assert saved_ck < 0.7 * saved, (saved_ck, saved)
    # the graph that ran is the block-wise copy; the graph itself did not change
    assert len(lm.call_graphs) == 1
    entry = lm.call_graphs[0]
    kinds = [k for k in entry._executables if isinstance(k, tuple)]
    assert kinds and kinds[0][0] == "checkpointed"
    # eval and no-grad forwards do not checkpoint
    lm.eval()
    with torch.no_grad():
        assert torch.equal(lm(x, attention_mask=mask, labels=x).logits, lm(x, attention_mask=mask, labels=x).logits)
    lm.gradient_checkpointing_disable()
    assert not lm.is_gradient_checkpointing


@pytest.mark.slow
def test_every_n_layers_and_offload():
    x = ids(2, 16, vocab=96, seed=4)
    mask = torch.ones_like(x)
    example = {"input_ids": x, "attention_mask": mask, "labels": x}
    lm = graphlora.transform(_llama(4), [LoraRule(r".*(q|v)_proj", rank=4)], (), example)
    with torch.no_grad():
        for p in lm.lora_parameters():
            p.normal_(std=0.1)
    lm.train()
    _, grads, saved = _step(lm, x, mask)
    results = {}
    for options in ({"every_n_layers": 1}, {"every_n_layers": 2}, {"offload": True}):
        lm.activation_checkpointing_enable(**options)
        _, grads_ck, results[str(options)] = _step(lm, x, mask)
        for k in grads:
            torch.testing.assert_close(grads_ck[k], grads[k], rtol=1e-6, atol=1e-7)
    # checkpointing half the blocks keeps more than checkpointing all of them, less than none
    assert results["{'every_n_layers': 1}"] < results["{'every_n_layers': 2}"] < saved
    with pytest.raises(graphlora.PassError, match="every_n_layers"):
        lm.activation_checkpointing_enable(every_n_layers=0)


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)))


def test_a_model_without_blocks_says_so():
    lm = graphlora.transform(_TwoLayers(), [LoraRule("inp", rank=2)], (torch.randn(2, 8),))
    lm.train()
    lm.gradient_checkpointing_enable()
    with pytest.raises(graphlora.PassError, match="no transformer blocks"):
        lm(torch.randn(2, 8))
