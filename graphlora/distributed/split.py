"""Running the flat graph block by block, so that FSDP's module hooks fire.

A traced graph never calls its submodules: the one flat graph reads every tensor with
``get_attr``. FSDP2 gathers a unit's parameters in a forward pre-hook of the unit's module, so
each transformer block needs a real call. The flat graph is cut into one subgraph per block and
a root graph that calls the blocks (:func:`graphlora.block_split.split_graph`); this module
installs their code as the forward of the block modules and the GraphModule. The flat graph
stays the model's graph; the split is derived from it and rebuilt whenever it changes.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import fx

from graphlora.adapters import ADAPTERS_ROOT
from graphlora.block_split import BlockIndex, split_graph
from graphlora.block_split import compile_graph as _compile
from graphlora.errors import DistributedError

__all__ = ["execution_state", "noop_forward", "run_blockwise", "split_graph"]

_STATE_ATTR = "_graphlora_sharded"  # on the GraphModule: the split-execution state


def noop_forward(*args: Any, **kwargs: Any) -> None:
    """Forward of an adapter container: calling it marks the container's FSDP hooks as run."""


class _ShardedExecution:
    """The split execution of one sharded GraphModule; rebuilt whenever the flat graph changes
    (``train()``/``eval()`` flip dropout flags and recompile, adapter switches rewrite branches)."""

    def __init__(self, gm: fx.GraphModule, blocks: Sequence[str], containers: Mapping[str, list[str]]):
        self.owner = weakref.ref(gm)
        self.blocks = list(blocks)
        self.containers = {b: list(c) for b, c in containers.items()}
        self.code: str | None = None
        self.root_fn: Callable[..., Any] | None = None
        self.rebuild(gm)

    def rebuild(self, gm: fx.GraphModule) -> None:
        _check_adapters_sharded(gm.graph, self.blocks, self.containers)
        split = split_graph(gm.graph, self.blocks, self.containers)
        for b, graph in split.blocks.items():
            # bound to the GraphModule: the block's code reads absolute attribute paths
            gm.get_submodule(b).__dict__["forward"] = types.MethodType(_compile(graph, b), gm)
        self.root_fn = _compile(split.root, "root")
        self.code = gm.code


def _check_adapters_sharded(graph: fx.Graph, blocks: Sequence[str], containers: Mapping[str, Sequence[str]]) -> None:
    """LoRA weights created after sharding are in no FSDP group: their gradients would never be
    reduced across ranks. Refuse instead of letting the ranks train apart."""
    index = BlockIndex(blocks)
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        block, adapter = index.of_attr(str(node.target))
        if block is not None and adapter is not None and f"{ADAPTERS_ROOT}.{adapter}.{block}" not in containers.get(block, ()):
            raise DistributedError(
                f"adapter {adapter!r} was created after shard_lora_model(): its LoRA weights in block "
                f"{block!r} are not sharded with the block, so their gradients would not be reduced "
                "across ranks. Add adapters before sharding"
            )


def _sharded_forward(self: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
    """``forward`` of a sharded GraphModule: run the split graphs (rebuilt if the flat graph
    changed). A copy (``LoraModel.merge`` deep-copies the GraphModule) runs its own graph."""
    state = execution_state(self)
    if state is None or state.owner() is not self:
        return type(self).forward(self, *args, **kwargs)
    if self.code is not state.code:
        state.rebuild(self)
    return state.root_fn(self, *args, **kwargs)


def run_blockwise(gm: fx.GraphModule, blocks: Sequence[str], containers: Mapping[str, list[str]]) -> None:
    """Make ``gm`` run block by block from now on: each block module and ``gm`` get the split
    graphs' code as their forward (see :func:`split_graph`)."""
    gm.__dict__[_STATE_ATTR] = _ShardedExecution(gm, blocks, containers)
    gm.__dict__["forward"] = types.MethodType(_sharded_forward, gm)


def execution_state(gm: fx.GraphModule) -> _ShardedExecution | None:
    """The split execution :func:`run_blockwise` installed on ``gm`` (None: ``gm`` runs flat)."""
    return gm.__dict__.get(_STATE_ATTR)
