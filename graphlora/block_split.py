"""Transformer blocks of a traced graph, and the flat graph cut into one call per block.

A traced graph never calls its submodules: the one flat graph reads every tensor with
``get_attr``. Two features need the blocks back as units: FSDP2 gathers a unit's parameters in a
forward pre-hook of the unit's module (:mod:`graphlora.distributed`), and activation
checkpointing recomputes a unit in backward (:mod:`graphlora.activation_checkpointing`). This
module finds the blocks of the original model (:func:`find_transformer_blocks`, from the module
tree the graph keeps and the module path every node records) and cuts the flat graph into one
subgraph per block (the nodes whose module path lies under the block) and a root graph that
calls the blocks (:func:`split_graph`), compiled to Python functions (:func:`compile_graph`).
The flat graph stays the model's graph; a split is derived from it.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from graphlora import meta
from graphlora.adapters import ADAPTERS_ROOT
from graphlora.errors import DistributedError, InputError
from graphlora.graph_utils import is_own
from graphlora.patterns import PatternSet

__all__ = ["BlockIndex", "compile_graph", "find_transformer_blocks", "node_path", "split_graph"]


def find_transformer_blocks(gm: fx.GraphModule, pattern: str | None = None) -> list[str]:
    """Module paths of the repeated blocks of a traced model, in graph order.

    By default: the children of every outermost "indexed" module (all child names are integers,
    like an ``nn.ModuleList``: ``model.layers.<i>``, ``encoder.layer.<i>``, ``transformer.h.<i>``)
    that the graph runs code in. Only the outermost ones: MoE experts inside a block stay in the block.
    graphlora's own trees (``graphlora_*``) are skipped. ``pattern``: a regex that must
    ``fullmatch`` the module paths to take instead (e.g. ``r"model\\.layers\\.\\d+"``).
    """
    names = {name for name, _ in gm.named_modules() if name and not is_own(name)}
    if pattern is not None:
        rx = PatternSet("find_transformer_blocks", error=InputError).compile(pattern, "pattern")
        chosen = [n for n in names if rx.fullmatch(n)]
        chosen = [n for n in chosen if not any(n.startswith(o + ".") for o in chosen if o != n)]
    else:
        chosen = _indexed_children(gm)
    order = _first_use_order(gm)
    return sorted((p for p in chosen if p in order), key=lambda p: (order[p], p))


def _indexed_children(gm: nn.Module) -> list[str]:
    found: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        children = list(module._modules.items())
        if children and all(k.isdigit() for k, _ in children) and prefix:
            found.extend(f"{prefix}.{k}" for k, c in children if c is not None and _has_tensors(c))
            return
        for k, child in children:
            path = f"{prefix}.{k}" if prefix else k
            if child is not None and not is_own(path):
                visit(child, path)

    visit(gm, "")
    return found


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _first_use_order(gm: fx.GraphModule) -> dict[str, int]:
    """Module path -> index of the first graph node that runs in it (modules the graph never
    runs in are absent). Reads (``get_attr``) do not count: export puts them all first."""
    order: dict[str, int] = {}
    for i, node in enumerate(gm.graph.nodes):
        if node.op in ("get_attr", "placeholder", "output"):
            continue
        path = node_path(node)
        while path:
            order.setdefault(path, i)
            path = path.rpartition(".")[0]
    return order


def node_path(node: fx.Node) -> str | None:
    """The innermost module path a node belongs to (export's ``nn_module_stack``, else graphlora's
    metadata, else the owner of the attribute a ``get_attr`` reads)."""
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0] or None
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        # export marks nodes outside every module with a placeholder entry
        if isinstance(path, str) and path and not path.startswith("_empty_nn_module_stack"):
            return path
    info = meta.info(node)
    return info.get("module_path")


@dataclass
class _Split:
    """A flat graph cut into a root graph that calls one subgraph per block."""

    root: fx.Graph
    blocks: dict[str, fx.Graph]


class BlockIndex:
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


def _assign_nodes(graph: fx.Graph, index: BlockIndex) -> dict[fx.Node, str | None]:
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


def split_graph(
    flat: fx.Graph,
    blocks: Sequence[str],
    containers: Mapping[str, Sequence[str]] | None = None,
    *,
    unit: str = "FSDP unit",
    error: type[Exception] = DistributedError,
    tensors_inside: bool = True,
) -> _Split:
    """Cut ``flat`` into per-block subgraphs plus a root graph calling them (``call_module``).

    Every graph addresses tensors and modules relative to the GraphModule itself (the blocks'
    code runs with ``self`` = the GraphModule), so no attribute is renamed. A block's subgraph
    first calls its adapter containers (``containers[block]``): FSDP finishes a group's forward
    when every module of the group has run, and only then reshards it after the block. Root
    code that uses a block's values is moved after the block's call when the block does not
    depend on it. Raises ``error`` (naming the ``unit`` a block becomes) when the block's
    computation depends on root code that depends on the block, and, with ``tensors_inside``
    (FSDP: a block's tensors exist only while it runs), when a block's tensors are read outside it.
    """
    containers = containers or {}
    index = BlockIndex(blocks)
    where = _assign_nodes(flat, index)
    nodes = list(flat.nodes)
    if tensors_inside:
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
        raise error(
            f"no graph node runs in block(s) {', '.join(empty)}: these module paths are not "
            "blocks of this graph (see find_transformer_blocks)"
        )
    subgraphs: dict[str, fx.Graph] = {}
    interfaces: dict[str, tuple[list[fx.Node], list[fx.Node]]] = {}
    for b in blocks:
        subgraphs[b], *io = _block_graph(b, members[b], where, containers.get(b, ()))
        interfaces[b] = (io[0], io[1])
    root = _root_graph(flat, nodes, where, {i: b for b, i in last.items()}, interfaces, unit, error)
    return _Split(root=root, blocks=subgraphs)


def _check_block_tensors_stay_inside(nodes: Sequence[fx.Node], where: Mapping[fx.Node, str | None], index: BlockIndex) -> None:
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
    unit: str,
    error: type[Exception],
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
                raise error(
                    f"block {block!r} uses {missing[0].name}, which is computed outside the block from "
                    "the block's own values: the block's computation is interleaved with code outside "
                    f"it, so it cannot run as one {unit}. Pass blocks=[...] with coarser blocks"
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
        raise error(
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


def compile_graph(graph: fx.Graph, name: str) -> Callable[..., Any]:
    """Python function ``forward(self, ...)`` for ``graph`` (what GraphModule.recompile builds),
    without creating a GraphModule that would hold references to the tensors."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<graphlora block {name}>", "exec"), namespace)  # noqa: S102
    return namespace["forward"]
