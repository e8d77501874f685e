"""Activation checkpointing of a traced graph: each transformer block recomputed in backward.

Eager transformers checkpoint a model by calling each decoder layer through
``torch.utils.checkpoint``. A traced graph has no layer calls, so the graph that runs a training
step is cut into its blocks first (:func:`graphlora.block_split.split_graph`, the cut FSDP uses)
and a root graph calls each block through ``checkpoint``: only a block's inputs are kept for
backward, everything inside is recomputed there. The recomputation runs the same ops on the same
values (with the RNG state restored for dropout), so the gradients are those without
checkpointing. This is an execution copy like the fused one: the graph itself does not change.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from graphlora.block_split import compile_graph, find_transformer_blocks, split_graph
from graphlora.errors import PassError

__all__ = ["CheckpointPolicy", "checkpointed_copy"]


@dataclass(eq=False)
class CheckpointPolicy:
    """How to checkpoint: ``torch.utils.checkpoint`` options (non-reentrant by default), every
    ``every_n_layers``-th block, and ``offload`` (block inputs saved on the CPU)."""

    options: dict[str, Any] = field(default_factory=dict)
    every_n_layers: int = 1
    offload: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.every_n_layers, int) or self.every_n_layers < 1:
            raise PassError(f"every_n_layers must be a positive integer, got {self.every_n_layers!r}")
        self.options = {"use_reentrant": False, **self.options}

    def wrap(self, gm: fx.GraphModule) -> fx.GraphModule:
        return checkpointed_copy(gm, self)


class _Block(nn.Module):
    """One block of the split graph, called by the root graph; checkpointed or run as it is."""

    def __init__(self, fn: Callable[..., Any], checkpointed: bool, policy: CheckpointPolicy):
        super().__init__()
        self.__dict__["fn"] = fn  # bound to the graph module whose tensors it reads: no submodule
        self.checkpointed = checkpointed
        self.policy = policy

    def forward(self, *inputs: Any) -> Any:
        if not (self.checkpointed and torch.is_grad_enabled()):
            return self.fn(*inputs)
        offload = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) \
            if self.policy.offload else contextlib.nullcontext()
        with offload:
            return torch.utils.checkpoint.checkpoint(self.fn, *inputs, **self.policy.options)


def checkpointed_copy(gm: fx.GraphModule, policy: CheckpointPolicy) -> fx.GraphModule:
    """A GraphModule computing what ``gm`` computes, block by block, under ``policy``.

    It reads ``gm``'s tensors and submodules (shared, not copied). Raises :class:`PassError`
    when ``gm`` has no transformer blocks (see :func:`find_transformer_blocks`) or a block's
    computation is interleaved with code outside it.
    """
    blocks = find_transformer_blocks(gm)
    if not blocks:
        raise PassError(
            "activation checkpointing found no transformer blocks in the graph (no module with "
            "integer-named children such as model.layers.0): there is nothing to recompute per block"
        )
    split = split_graph(gm.graph, blocks, unit="checkpointed block", error=PassError, tensors_inside=False)
    members: dict[str, Any] = {}
    for i, block in enumerate(blocks):
        fn = types.MethodType(compile_graph(split.blocks[block], block), gm)
        members[block] = _Block(fn, checkpointed=i % policy.every_n_layers == 0, policy=policy)
    for node in split.root.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in members:
            members[node.target] = _resolve(gm, str(node.target))
    root = fx.GraphModule(members, split.root, class_name="CheckpointedGraph")
    root.meta = gm.meta
    root.training = gm.training
    return root


def _resolve(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value
