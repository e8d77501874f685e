"""Transformer blocks of a traced graph, and the flat graph cut into one call per block.

A traced graph never calls its submodules: the one flat graph reads every tensor with
``get_attr``. Three features need the blocks back as units: FSDP2 gathers a unit's parameters in a
forward pre-hook of the unit's module (:mod:`graphlora.distributed`), activation checkpointing
recomputes a unit in backward (:mod:`graphlora.activation_checkpointing`), and sequential
calibration (GPTQ, :mod:`graphlora.passes.sequential`) runs the graph one segment at a time over
cached boundary values (:func:`plan_segments`: code outside the blocks, a block, code outside,
the next block, ...; :func:`subgraph`: one segment as a graph). This
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
from graphlora.errors import DistributedError, GraphloraError, InputError
from graphlora.graph_utils import is_own
from graphlora.patterns import PatternSet

__all__ = [
    "BlockError", "BlockIndex", "Segment", "Subgraph", "assign_nodes", "check_blocks", "compile_graph",
    "find_transformer_blocks", "node_path", "plan_segments", "split_graph", "subgraph",
]


def find_transformer_blocks(
    gm: fx.GraphModule, pattern: str | None = None, *, source: str = "find_transformer_blocks"
) -> list[str]:
    """Module paths of the repeated blocks of a traced model, in graph order.

    By default: the children of every outermost "indexed" module (all child names are integers,
    like an ``nn.ModuleList``: ``model.layers.<i>``, ``encoder.layer.<i>``, ``transformer.h.<i>``)
    that the graph runs code in. Only the outermost ones: MoE experts inside a block stay in the block.
    graphlora's own trees (``graphlora_*``) are skipped. ``pattern``: a regex that must
    ``fullmatch`` the module paths to take instead (e.g. ``r"model\\.layers\\.\\d+"``), matched
    with a time bound (:mod:`graphlora.patterns`); ``source`` names the caller in its errors.
    """
    names = {name for name, _ in gm.named_modules() if name and not is_own(name)}
    if pattern is not None:
        rx = PatternSet(source, error=InputError).compile(pattern, "pattern")
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


class BlockError(GraphloraError):
    """The graph cannot be cut into the blocks asked for (a block that runs no code, or a block
    whose computation is interleaved with code outside it)."""


@dataclass
class Segment:
    """Consecutive work of the cut graph: one block's nodes, or code outside every block
    (``block`` None) between two blocks. ``nodes`` are nodes of the flat graph, in an order
    that respects their dependencies."""

    block: str | None
    nodes: list[fx.Node]


def plan_segments(
    flat: fx.Graph,
    blocks: Sequence[str],
    where: Mapping[fx.Node, str | None] | None = None,
    *,
    unit: str = "unit",
    error: type[Exception] = BlockError,
) -> tuple[list[Segment], dict[fx.Node, str | None]]:
    """Cut ``flat`` into segments: each block becomes one segment at the position of the block's
    last node, and the code outside the blocks runs between them, as early as its inputs allow
    (code that reads a block's values runs after the block). Every segment reads only values of
    earlier segments (and placeholders, which open the first segment). The output node is in no
    segment. Returns the segments and the block of every node (``where``: that assignment,
    when the caller already made it with :func:`assign_nodes`).

    Raises ``error`` (naming the ``unit`` a block becomes) when a block runs no code, or when a
    block uses a value computed outside it from the block's own values (its computation is
    interleaved with other code). FSDP's split and sequential calibration both run this order.
    """
    where = dict(where) if where is not None else assign_nodes(flat, BlockIndex(blocks))
    nodes = list(flat.nodes)
    members: dict[str, list[fx.Node]] = {b: [] for b in blocks}
    last_of: dict[str, int] = {}
    for i, node in enumerate(nodes):
        b = where[node]
        if b is not None:
            members[b].append(node)
            if node.op != "get_attr":
                last_of[b] = i
    empty = [b for b in blocks if b not in last_of]
    if empty:
        raise error(
            f"no graph node runs in block(s) {', '.join(empty)}: these module paths are not "
            "blocks of this graph (see find_transformer_blocks)"
        )
    last = {i: b for b, i in last_of.items()}
    segments: list[Segment] = []
    current: list[fx.Node] = []
    placed: set[fx.Node] = set()
    waiting: list[fx.Node] = []

    def ready(node: fx.Node) -> bool:
        return all(a in placed for a in node.all_input_nodes)

    def place(node: fx.Node) -> None:
        current.append(node)
        placed.add(node)

    def flush() -> None:
        progress = True
        while progress:
            progress = False
            for node in list(waiting):
                if ready(node):
                    place(node)
                    waiting.remove(node)
                    progress = True

    for i, node in enumerate(nodes):
        if node.op != "output" and where[node] is None:
            if ready(node):
                place(node)
            else:
                waiting.append(node)
        block = last.get(i)
        if block is None:
            continue
        inside = set(members[block])
        missing = [a for n in members[block] for a in n.all_input_nodes if a not in inside and a not in placed]
        if missing:
            raise error(
                f"block {block!r} uses {missing[0].name}, which is computed outside the block from "
                "the block's own values: the block's computation is interleaved with code outside "
                f"it, so it cannot run as one {unit}. Pass blocks=[...] with coarser blocks"
            )
        if current:
            segments.append(Segment(None, current))
            current = []
        segments.append(Segment(block, list(members[block])))
        placed.update(inside)
        flush()
    flush()
    if waiting:
        raise error(
            f"could not place {waiting[0].name} after splitting the blocks; pass blocks=[...] with coarser blocks"
        )
    if current:
        segments.append(Segment(None, current))
    return segments, where


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


def assign_nodes(graph: fx.Graph, index: BlockIndex) -> dict[fx.Node, str | None]:
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
    where = assign_nodes(flat, index)
    nodes = list(flat.nodes)
    if tensors_inside:
        _check_block_tensors_stay_inside(nodes, where, index)
    segments, _ = plan_segments(flat, blocks, where, unit=unit, error=error)
    members = {seg.block: seg.nodes for seg in segments if seg.block is not None}
    subgraphs: dict[str, fx.Graph] = {}
    interfaces: dict[str, tuple[list[fx.Node], list[fx.Node]]] = {}
    for b in blocks:
        subgraphs[b], *io = _block_graph(b, members[b], where, containers.get(b, ()))
        interfaces[b] = (io[0], io[1])
    return _Split(root=_root_graph(flat, segments, interfaces), blocks=subgraphs)


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
    flat: fx.Graph, segments: Sequence[Segment], interfaces: Mapping[str, tuple[list[fx.Node], list[fx.Node]]]
) -> fx.Graph:
    """The flat graph with each block's nodes replaced by one ``call_module``, in the order of
    :func:`plan_segments` (root code waiting for a block's values follows its call)."""
    root = fx.Graph()
    root._codegen = flat._codegen
    env: dict[fx.Node, fx.Node] = {}
    for seg in segments:
        if seg.block is None:
            for node in seg.nodes:
                env[node] = root.node_copy(node, env.__getitem__)
            continue
        inputs, outputs = interfaces[seg.block]
        call = root.call_module(seg.block, tuple(env[n] for n in inputs))
        call.meta[meta.BLOCK_KEY] = seg.block
        for j, out in enumerate(outputs):
            item = root.call_function(operator.getitem, (call, j))
            if "val" in out.meta:
                item.meta["val"] = out.meta["val"]
            env[out] = item
    for node in flat.nodes:
        if node.op == "output":
            root.node_copy(node, env.__getitem__)
    root.lint()
    return root


def _block_graph(
    block: str, nodes: Sequence[fx.Node], where: Mapping[fx.Node, str | None], containers: Sequence[str]
) -> tuple[fx.Graph, list[fx.Node], list[fx.Node]]:
    """One block's subgraph: placeholders for values from outside, a tuple of values used outside;
    it first calls the block's adapter containers."""

    def call_containers(graph: fx.Graph) -> None:
        for path in containers:
            graph.call_module(path, ())

    sub = subgraph(nodes, used_outside=lambda n: any(where[u] != block for u in n.users), prelude=call_containers)
    return sub.graph, sub.inputs, sub.outputs


@dataclass
class Subgraph:
    """A segment as a graph of its own: placeholders for the values it reads from outside
    (``inputs``, nodes of the flat graph), and a tuple output of the values used outside it
    (``outputs``). ``nodes`` maps each flat node the graph reads or computes to its node there
    (an input to its placeholder)."""

    graph: fx.Graph
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    nodes: dict[fx.Node, fx.Node]


def subgraph(
    nodes: Sequence[fx.Node],
    *,
    used_outside: Callable[[fx.Node], bool] | None = None,
    prelude: Callable[[fx.Graph], Any] | None = None,
    copy_reads: bool = False,
) -> Subgraph:
    """The graph of ``nodes`` (flat-graph nodes in dependency order; placeholders among them
    are read like any value from outside).

    ``used_outside(node)`` says whether a value is needed after the segment (default: it has a
    user not in ``nodes``). ``prelude(graph)`` adds nodes before the copies (FSDP calls the
    block's adapter containers there). ``copy_reads``: an attribute read from outside is copied
    into the graph instead of becoming an input, so the graph always reads the current tensor.
    """
    nodes = [n for n in nodes if n.op != "placeholder"]  # a placeholder read is an input
    inside = set(nodes)
    if used_outside is None:
        used_outside = lambda n: any(u not in inside for u in n.users)  # noqa: E731
    reads: list[fx.Node] = []
    inputs: list[fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg in inside or arg in inputs or arg in reads:
                continue
            (reads if copy_reads and arg.op == "get_attr" else inputs).append(arg)
    outputs = [n for n in nodes if used_outside(n)]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for arg in inputs:
        ph = graph.placeholder(arg.name)
        ph.meta = dict(arg.meta)
        env[arg] = ph
    if prelude is not None:
        prelude(graph)
    for node in reads:
        env[node] = graph.node_copy(node, lambda a: env[a])
    for node in nodes:
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(tuple(env[n] for n in outputs))
    graph.lint()
    return Subgraph(graph, inputs, outputs, env)


def check_blocks(modules: Mapping[str, nn.Module], paths: Sequence[str]) -> str | None:
    """What is wrong with ``paths`` as blocks of a graph with these modules (None: nothing)."""
    missing = [p for p in paths if p not in modules]
    if missing:
        return (f"block path(s) {', '.join(missing[:5])} are not modules of the traced graph; module "
                "paths look like 'model.layers.0' (graphlora.distributed.find_transformer_blocks lists them)")
    nested = [(a, b) for a in paths for b in paths if a != b and b.startswith(a + ".")]
    if nested:
        return f"blocks must not nest: {nested[0][1]!r} is inside {nested[0][0]!r}"
    if len(set(paths)) != len(paths):
        return "the same block path is given twice"
    return None


def compile_graph(graph: fx.Graph, name: str) -> Callable[..., Any]:
    """Python function ``forward(self, ...)`` for ``graph`` (what GraphModule.recompile builds),
    without creating a GraphModule that would hold references to the tensors."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<graphlora block {name}>", "exec"), namespace)  # noqa: S102
    return namespace["forward"]
