"""Small models used across the tests: one per linear-site spelling, and transformers configs."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


class Conv1D(nn.Module):
    """transformers' Conv1D: weight stored (in, out), applied with addmm on a 2-D view."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class AllSpellings(nn.Module):
    """Every way graphlora recognises a linear layer, in one forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)
        self.inp = nn.Linear(16, 16)
        self.raw = nn.Parameter(torch.randn(12, 16) * 0.2)  # used as x @ raw.T
        self.conv = Conv1D(10, 12)  # addmm with (in, out) weight
        self.proj = nn.Parameter(torch.randn(10, 6) * 0.2)  # used as torch.matmul(x, proj)
        self.out = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        h = torch.relu(self.lin(x))
        h = F.linear(h, self.inp.weight, self.inp.bias)
        h = h @ self.raw.T
        h = torch.tanh(self.conv(h))
        h = torch.matmul(h, self.proj)
        return self.out(h)


class SharedWeight(nn.Module):
    """One Linear applied twice, plus a weight read as an embedding and as a linear (tied)."""

    def __init__(self, vocab: int = 20, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids):
        h = self.embed(ids)
        h = torch.relu(self.block(h))
        h = self.block(h)
        return self.head(h)


class MLP(nn.Module):
    def __init__(self, dims=(8, 32, 32, 4), dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(self.drop(x) if i else x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


def tiny_llama(layers: int = 2, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2Model(cfg).eval()


def ids(batch: int = 2, seq: int = 8, vocab: int = 100, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


@contextlib.contextmanager
def canonical_execution(lm):
    """Run ``lm``'s canonical graph (``fused_execution`` off) inside the block, then restore it:
    for comparisons that must not see the fused copy's summation order."""
    lm.fused_execution = False
    try:
        yield lm
    finally:
        lm.fused_execution = True


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, h):
        return h + self.down(torch.relu(self.up(h)))


class Stack(nn.Module):
    """A small hand-written "transformer": input projection, a ModuleList of residual blocks, head.

    ``tie``: every block also reads block 0's weight (a weight shared across blocks).
    ``inline``: the stack runs the blocks' layers itself, with its own activation module in
    between, so code of another module runs between a block's own operations.
    """

    def __init__(self, dim: int = 16, depth: int = 3, tie: bool = False, inline: bool = False):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 3)
        self.act = nn.ReLU()
        self.tie, self.inline = tie, inline

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = h + b.down(self.act(b.up(h))) if self.inline else b(h)
            if self.tie:
                h = h + self.blocks[0].down.weight[0, :1]
        return self.head(h)


def fill_peft_factors(peft_model, seed: int, std: float = 0.1) -> None:
    """Give every LoRA tensor of a PEFT model random values (a stand-in for training: PEFT's B = 0
    would make its adapter the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))
