"""Dequantize each quantized weight once: its dequantize node becomes a read of the float result.

An *execution* rewrite for inference with :attr:`graphlora.LoraModel.cache_dequantized_weights`
on, applied to a storage-sharing copy of a graph (never to the canonical graph, which saving and
export read): a QLoRA forward otherwise rebuilds every float weight from its codes on every
call, which at decode sizes (1 to 16 tokens) costs several times the GEMMs themselves. The
values are exactly what the dequantize nodes compute, so the copy computes bit for bit what the
graph does; the price is one float copy of every quantized weight while the copy lives.
"""

from __future__ import annotations

import torch.fx as fx

from graphlora import meta
from graphlora.errors import PassError
from graphlora.graph_utils import OWN_PREFIX, erase_unused_chain, evaluate, fake_mode, insert_get_attr, set_tensor
from graphlora.passes.base import GraphPass, PassResult
from graphlora.passes.weights import drop_unread_tensors

CACHE_ROOT = f"{OWN_PREFIX}dequantized"


class DequantizeOncePass(GraphPass):
    """Replace every ``dequant`` node by a buffer holding its value (computed now)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = [n for n in gm.graph.nodes if meta.role(n) == "dequant" and n.op == "call_function"]
        mode = fake_mode(gm)
        taken: set[str] = set()
        for node in nodes:
            value = evaluate(gm, node).detach()
            # named after the weight, so the graphs of one model (prefill, decode, forward) can
            # share one cached copy by name (generation._share_merged)
            qual = f"{CACHE_ROOT}.{(meta.info(node).get('tensor') or node.name).replace('.', '_')}"
            while qual in taken:
                qual += "_"
            taken.add(qual)
            set_tensor(gm, qual, value, parameter=False)
            with gm.graph.inserting_before(node):
                read = insert_get_attr(gm.graph, qual, mode=mode)
            read.meta.update({k: v for k, v in node.meta.items() if k == "val"})
            node.replace_all_uses_with(read)
            erase_unused_chain([node])
        if nodes:
            drop_unread_tensors(gm)
        return PassResult(gm, bool(nodes))

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [n.name for n in gm.graph.nodes if meta.role(n) == "dequant" and n.op == "call_function"]
        if left:
            raise PassError(f"{self.name}: dequantize nodes left at {', '.join(left[:5])}")
