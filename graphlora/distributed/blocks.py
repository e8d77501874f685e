"""Finding the transformer blocks of a traced model: the units FSDP shards.

A traced graph keeps the original module tree (``graph_module.named_modules()``) and records in
every node the module it ran in, so the blocks of the original model are found from the module
tree and ordered by where the graph first runs code in them (:mod:`graphlora.block_split`, where
activation checkpointing finds them too).
"""

from __future__ import annotations

from torch import fx

from graphlora import block_split
from graphlora.block_split import node_path
from graphlora.model import LoraModel

__all__ = ["find_transformer_blocks", "node_path"]


def find_transformer_blocks(model: LoraModel | fx.GraphModule, pattern: str | None = None) -> list[str]:
    """Module paths of the repeated blocks of a traced model, in graph order (see
    :func:`graphlora.block_split.find_transformer_blocks`)."""
    gm = model.graph_module if isinstance(model, LoraModel) else model
    return block_split.find_transformer_blocks(gm, pattern)
