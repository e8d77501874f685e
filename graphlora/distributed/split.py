"""Splitting the flat graph into per-block calls, so that FSDP's module hooks fire.

A traced graph never calls its submodules: the one flat graph reads every tensor with
``get_attr``. FSDP2 gathers a unit's parameters in a forward pre-hook of the unit's module, so
each transformer block needs a real call. This module cuts the flat graph into one subgraph per
block (the nodes whose module path lies under the block) and a root graph that calls the
blocks, generates Python code for each, and installs it as the forward of the block modules and
the GraphModule. The flat graph stays the model's graph; the split is derived from it and
rebuilt whenever it changes.
"""

from __future__ import annotations

import bisect
import operator
import types
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx

from graphlora import meta
from graphlora.adapters import ADAPTERS_ROOT
from graphlora.distributed.blocks import node_path
from graphlora.errors import DistributedError

__all__ = ["execution_state", "noop_forward", "run_blockwise", "split_graph"]

_STATE_ATTR = "_graphlora_sharded"  # on the GraphModule: the split-execution state


@dataclass
class _Split:
    """A flat graph cut into a root graph that calls one subgraph per block."""

    root: fx.Graph
    blocks: dict[str, fx.Graph]


class _BlockIndex:
    """Which block a module path or a tensor attribute belongs to (a prefix lookup, so the cost
    per node is the depth of its path, not the number of blocks)."""

    def __init__(self, blocks: Iterable[str]):
        self.blocks = set(blocks)

    def of_path(self, path: str | None) -> str | None:
        if not path:
            return None
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in self.blocks:
                return prefix
        return None

    def of_attr(self, target: str) -> tuple[str | None, str | None]:
        """(block, adapter) owning the tensor at ``target``: a block's own tensors, or LoRA
        factors ``graphlora_adapters.<adapter>.<block path>...`` (adapter is None for those)."""
        if target.startswith(ADAPTERS_ROOT + "."):
            _, adapter, rest = (target.split(".", 2) + ["", ""])[:3]
            return self.of_path(rest), adapter
        return self.of_path(target), None


def _assign_nodes(graph: fx.Graph, index: _BlockIndex) -> dict[fx.Node, str | None]:
    """Which block each node runs in (None: the root graph).

    Computations go by module path; a node without one takes the block of its neighbours when
    both agree. A ``get_attr`` goes into a block when every user is in that block (it is read
    right where it is used, after FSDP gathered it); otherwise it stays in the root.
    """
    nodes = list(graph.nodes)
    where: dict[fx.Node, str | None] = {n: None for n in nodes}
    known: list[int] = []
    unknown: list[int] = []
    for i, node in enumerate(nodes):
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        path = node_path(node)
        (known if path is not None else unknown).append(i)
        where[node] = index.of_path(path)
    for i in unknown:
        k = bisect.bisect_left(known, i)
        if 0 < k < len(known) and where[nodes[known[k - 1]]] == where[nodes[known[k]]]:
            where[nodes[i]] = where[nodes[known[k]]]
    for node in nodes:
        if node.op == "get_attr" and node.users:
            owners = {where[u] for u in node.users}
            if len(owners) == 1:
                where[node] = owners.pop()
    return where


def split_graph(flat: fx.Graph, blocks: Sequence[str], containers: Mapping[str, Sequence[str]]) -> _Split:
    """Cut ``flat`` into per-block subgraphs plus a root graph calling them (``call_module``).

    Every graph addresses tensors and modules relative to the GraphModule itself (the blocks'
    code runs with ``self`` = the GraphModule), so no attribute is renamed. A block's subgraph
    first calls its adapter containers (``containers[block]``): FSDP finishes a group's forward
    when every module of the group has run, and only then reshards it after the block. Root
    code that uses a block's values is moved after the block's call when the block does not
    depend on it. Raises :class:`DistributedError` when a block's tensors are read outside the
    block or the block's computation depends on root code that depends on the block.
    """
    index = _BlockIndex(blocks)
    where = _assign_nodes(flat, index)
    nodes = list(flat.nodes)
    _check_block_tensors_stay_inside(nodes, where, index)
    members: dict[str, list[fx.Node]] = {b: [] for b in blocks}
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        b = where[node]
        if b is not None:
            members[b].append(node)
            if node.op != "get_attr":
                last[b] = i
    empty = [b for b in blocks if b not in last]
    if empty:
        raise DistributedError(
            f"no graph node runs in block(s) {', '.join(empty)}: these module paths are not "
            "blocks of this graph (see graphlora.distributed.find_transformer_blocks)"
        )
    subgraphs: dict[str, fx.Graph] = {}
    interfaces: dict[str, tuple[list[fx.Node], list[fx.Node]]] = {}
    for b in blocks:
        subgraphs[b], *io = _block_graph(b, members[b], where, containers.get(b, ()))
        interfaces[b] = (io[0], io[1])
    root = _root_graph(flat, nodes, where, {i: b for b, i in last.items()}, interfaces)
    return _Split(root=root, blocks=subgraphs)


def _check_block_tensors_stay_inside(nodes: Sequence[fx.Node], where: Mapping[fx.Node, str | None], index: _BlockIndex) -> None:
    """A block's tensors are gathered only while the block runs: reading one elsewhere (a weight
    tied across blocks or with the head) would read a shard."""
    for node in nodes:
        if node.op != "get_attr" or not node.users:
            continue
        owner, _ = index.of_attr(str(node.target))
        if owner is not None and where[node] != owner:
            users = sorted({where[u] or "<root>" for u in node.users})
            raise DistributedError(
                f"{node.target} belongs to block {owner!r} but is also used outside it (by "
                f"{', '.join(users)}): FSDP gathers a block's tensors only while the block runs. "
                "Pass blocks=[...] without this block, or untie the weight"
            )


def _root_graph(
    flat: fx.Graph,
    nodes: Sequence[fx.Node],
    where: Mapping[fx.Node, str | None],
    call_at: Mapping[int, str],
    interfaces: Mapping[str, tuple[list[fx.Node], list[fx.Node]]],
) -> fx.Graph:
    """The flat graph with each block's nodes replaced by one ``call_module`` at the position of
    the block's last node; root nodes waiting for a block's values follow its call."""
    root = fx.Graph()
    root._codegen = flat._codegen
    env: dict[fx.Node, fx.Node] = {}
    waiting: list[fx.Node] = []

    def ready(node: fx.Node) -> bool:
        return all(a in env for a in node.all_input_nodes)

    def flush() -> None:
        progress = True
        while progress:
            progress = False
            for node in list(waiting):
                if ready(node):
                    env[node] = root.node_copy(node, env.__getitem__)
                    waiting.remove(node)
                    progress = True

    output: fx.Node | None = None
    for i, node in enumerate(nodes):
        if node.op == "output":
            output = node
        elif where[node] is None:
            if ready(node):
                env[node] = root.node_copy(node, env.__getitem__)
            else:
                waiting.append(node)
        if i in call_at:
            block = call_at[i]
            inputs, outputs = interfaces[block]
            missing = [n for n in inputs if n not in env]
            if missing:
                raise DistributedError(
                    f"block {block!r} uses {missing[0].name}, which is computed outside the block from "
                    "the block's own values: the block's computation is interleaved with code outside "
                    "it, so it cannot run as one FSDP unit. Pass blocks=[...] with coarser blocks"
                )
            call = root.call_module(block, tuple(env[n] for n in inputs))
            call.meta[meta.BLOCK_KEY] = block
            for j, out in enumerate(outputs):
                item = root.call_function(operator.getitem, (call, j))
                if "val" in out.meta:
                    item.meta["val"] = out.meta["val"]
                env[out] = item
            flush()
    flush()
    if waiting:
        raise DistributedError(
            f"could not place {waiting[0].name} in the root graph after splitting the blocks; "
            "pass blocks=[...] with coarser blocks"
        )
    if output is not None:
        root.node_copy(output, env.__getitem__)
    root.lint()
    return root


def _block_graph(
    block: str, nodes: Sequence[fx.Node], where: Mapping[fx.Node, str | None], containers: Sequence[str]
) -> tuple[fx.Graph, list[fx.Node], list[fx.Node]]:
    """One block's subgraph: placeholders for values from outside, a tuple of values used outside."""
    inside = set(nodes)
    inputs: list[fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in nodes if any(where[u] != block for u in n.users)]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for arg in inputs:
        ph = graph.placeholder(arg.name)
        ph.meta = dict(arg.meta)
        env[arg] = ph
    for path in containers:
        graph.call_module(path, ())
    for node in nodes:
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(tuple(env[n] for n in outputs))
    graph.lint()
    return graph, inputs, outputs


def _compile(graph: fx.Graph, name: str) -> Callable[..., Any]:
    """Python function ``forward(self, ...)`` for ``graph`` (what GraphModule.recompile builds),
    without creating a GraphModule that would hold references to the tensors."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<graphlora fsdp {name}>", "exec"), namespace)  # noqa: S102
    return namespace["forward"]


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
    index = _BlockIndex(blocks)
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
