"""graphlora under ``torch.distributed``: DDP, FSDP2 (``fully_shard``), calibration across ranks,
and saving from rank 0.

graphlora does not distribute anything itself. A :class:`~graphlora.LoraModel` is an ordinary
``nn.Module`` whose only trainable tensors are the LoRA factors, so PyTorch's own engines apply:

DDP
    ``DistributedDataParallel(lora_model)`` works as is: DDP buckets only parameters with
    ``requires_grad=True``, which are the LoRA factors; frozen float weights and packed (integer)
    quantized buffers get no gradient bucket. :func:`wrap_ddp` adds one default (no buffer
    broadcast before every forward: packed base weights are identical on every rank, re-sending
    them each step is waste) and checks; :func:`ddp_bucket_parameter_names` shows the buckets.

FSDP2
    ``fully_shard`` works through module forward hooks, but a traced graph never calls its
    submodules: ``model.layers.3`` in a GraphModule is a plain container of tensors that the one
    flat graph reads with ``get_attr``. :func:`shard_lora_model` therefore gives every
    transformer block a real call: it splits the flat graph into one subgraph per block (the
    nodes whose module path lies under the block) and a root graph that calls the blocks, then
    applies ``fully_shard`` per block and to the model. The LoRA factors of a block live in a
    separate tree (``graphlora_adapters.<adapter>.<block path>``); they are sharded in the
    block's FSDP group through ``fully_shard([block, adapter container, ...])``, so they are
    all-gathered and their gradients reduce-scattered together with the block. The flat graph
    stays the model's graph (graph text, diffs, saving, ``train()``/``eval()`` all read it); the
    split is derived from it and rebuilt when it changes. Frozen packed weights are buffers,
    which FSDP leaves alone: they stay packed (replicated on every rank).

Calibration
    :func:`sync_stats` all-reduces the mergeable statistics of observers and GPTQ Hessian
    accumulators following their reduce protocol, so every rank computes the encodings one
    process would compute from all ranks' data. :func:`graphlora.calibrate` calls it.

Saving
    :func:`save_on_rank0` gathers sharded tensors, saves on rank 0 with
    :meth:`LoraModel.save_pretrained` and makes every rank wait for (and see the result of) the
    save.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import inspect
import operator
import re
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn

from graphlora.adapters import ADAPTERS_ROOT
from graphlora.errors import DistributedError
from graphlora.model import LoraModel

__all__ = [
    "ddp_bucket_parameter_names",
    "find_transformer_blocks",
    "gather_lora_state_dict",
    "is_initialized",
    "is_sharded",
    "save_on_rank0",
    "shard_lora_model",
    "sharded_blocks",
    "sync_stats",
    "unwrap_model",
    "wrap_ddp",
]

_REDUCE_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}
_STATE_ATTR = "_graphlora_sharded"  # on the GraphModule: the split-execution state


# =============================================================================================
# process group basics


def is_initialized() -> bool:
    """Whether a default process group exists (graphlora's distributed paths are no-ops otherwise)."""
    return dist.is_available() and dist.is_initialized()


def _rank(group: Any = None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def _require_initialized(what: str) -> None:
    if not is_initialized():
        raise DistributedError(
            f"{what} needs an initialised torch.distributed process group: launch with torchrun and "
            "call torch.distributed.init_process_group() first (backend 'nccl' on GPUs, 'gloo' on CPU)"
        )


def _comm_device(group: Any, tensor_device: torch.device) -> torch.device:
    """Where a collective's tensors must live: NCCL needs CUDA, gloo takes CPU tensors."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend and "nccl" not in backend:
        return torch.device("cpu")
    return tensor_device


def unwrap_model(model: nn.Module) -> LoraModel:
    """The LoraModel inside a DDP wrapper (or the model itself); why: helpers accept either."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if not isinstance(inner, LoraModel):
        raise DistributedError(
            f"expected a graphlora LoraModel (optionally wrapped in DistributedDataParallel), got "
            f"{type(inner).__name__}; build one with graphlora.transform()"
        )
    return inner


# =============================================================================================
# calibration statistics


def sync_stats(objs: Any, group: Any = None) -> None:
    """All-reduce mergeable statistics (observers, GPTQ Hessian accumulators) across ranks.

    ``objs``: an iterable (or mapping) of objects with ``state_tensors()`` /
    ``load_state_tensors()`` and ``reduce_phases()`` (a list of ``{tensor name: "sum" | "min" |
    "max"}``) or ``reduce_ops()`` (one phase), or an ``nn.Module`` whose submodules include such
    observers. Phases run in order because later ones depend on earlier ones (a histogram first
    agrees on its range, then sums counts); within a phase all objects' tensors of one op and
    dtype travel in one collective. Afterwards every rank holds the statistics one process would
    have after observing every rank's data. A no-op without an initialised process group.
    """
    objects = _stat_objects(objs)
    plans = [_reduce_plan(o) for o in objects]
    if not is_initialized() or dist.get_world_size(group) == 1:
        return
    # even with nothing to reduce: a rank with no objects must not leave the others hanging
    _check_same_on_all_ranks(objects, plans, group)
    for k in range(max((len(p) for p in plans), default=0)):
        members = [(o, plan[k]) for o, plan in zip(objects, plans) if k < len(plan)]
        reduced = _all_reduce_phase(members, group)
        for (obj, _), state in zip(members, reduced):
            obj.load_state_tensors(state)


def _stat_objects(objs: Any) -> list[Any]:
    """Flatten the accepted inputs into a list of distinct objects, in a rank-independent order.

    Distinct matters: a graph may call one observer module from several nodes, and reducing it
    twice would double its sums.
    """
    if isinstance(objs, nn.Module) and not hasattr(objs, "state_tensors"):
        items: Iterable[Any] = (m for _, m in objs.named_modules() if _has_protocol(m))
    elif isinstance(objs, Mapping):
        items = objs.values()
    elif hasattr(objs, "state_tensors"):
        items = [objs]
    else:
        items = objs
    seen: set[int] = set()
    out = []
    for obj in items:
        if id(obj) not in seen:
            seen.add(id(obj))
            out.append(obj)
    return out


def _has_protocol(obj: Any) -> bool:
    return (
        hasattr(obj, "state_tensors")
        and hasattr(obj, "load_state_tensors")
        and (hasattr(obj, "reduce_phases") or hasattr(obj, "reduce_ops"))
    )


def _reduce_plan(obj: Any) -> list[dict[str, str]]:
    """The object's reduce phases, checked: known ops, tensors that exist."""
    if not _has_protocol(obj):
        raise DistributedError(
            f"cannot reduce {type(obj).__name__} across ranks: it needs state_tensors(), "
            "load_state_tensors() and reduce_phases() or reduce_ops()"
        )
    phases = obj.reduce_phases() if hasattr(obj, "reduce_phases") else [obj.reduce_ops()]
    state = obj.state_tensors()
    for phase in phases:
        for name, op in phase.items():
            if op not in _REDUCE_OPS:
                raise DistributedError(
                    f"{_describe(obj)}: unknown reduce op {op!r} for {name!r} (expected sum, min or max)"
                )
            if name not in state or not isinstance(state[name], torch.Tensor):
                raise DistributedError(f"{_describe(obj)}: reduce phase names {name!r}, not a state tensor")
    return [dict(p) for p in phases]


def _describe(obj: Any) -> str:
    name = getattr(obj, "name", None)
    return f"{type(obj).__name__} {name!r}" if name else type(obj).__name__


def _signature(objects: Sequence[Any], plans: Sequence[list[dict[str, str]]]) -> list[Any]:
    """What must agree across ranks for the collectives to line up (kinds, order, shapes)."""
    sig = []
    for obj, plan in zip(objects, plans):
        state = obj.state_tensors()
        sig.append(
            (
                _describe(obj),
                [
                    [(k, op, str(state[k].dtype), tuple(state[k].shape)) for k, op in phase.items()]
                    for phase in plan
                ],
            )
        )
    return sig


def _check_same_on_all_ranks(objects: Sequence[Any], plans: Sequence[Any], group: Any) -> None:
    """Fail on every rank (instead of hanging or mixing up tensors) when ranks hold different
    statistics: e.g. one rank inserted observers at other sites."""
    sig = _signature(objects, plans)
    digest = hashlib.blake2b(repr(sig).encode(), digest_size=8).digest()
    h = int.from_bytes(digest, "little") >> 2  # fits int64 and its negation
    device = _comm_device(group, torch.device("cpu"))
    both = torch.tensor([h, -h], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if int(both[0]) == -int(both[1]):
        return
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, [s[0] for s in sig], group=group)
    counts = ", ".join(f"rank {r}: {len(g)}" for r, g in enumerate(gathered))
    raise DistributedError(
        "ranks hold different statistics to reduce (objects, order, kinds or shapes differ; "
        f"numbers of objects {counts}). Every rank must calibrate the same model with the same "
        "rules so that each has the same observers in the same order"
    )


def _all_reduce_phase(members: Sequence[tuple[Any, dict[str, str]]], group: Any) -> list[dict[str, torch.Tensor]]:
    """Reduce one phase of every member; tensors of equal (op, dtype) share one flat buffer."""
    states = [obj.state_tensors() for obj, _ in members]
    buckets: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for i, (_, phase) in enumerate(members):
        for name, op in phase.items():
            buckets.setdefault((op, str(states[i][name].dtype)), []).append((i, name))
    out: list[dict[str, torch.Tensor]] = [{} for _ in members]
    for (op, _), entries in sorted(buckets.items()):
        tensors = [states[i][name] for i, name in entries]
        device = _comm_device(group, tensors[0].device)
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in tensors])
        dist.all_reduce(flat, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]), group=group)
        offset = 0
        for (i, name), t in zip(entries, tensors):
            n = t.numel()
            out[i][name] = flat[offset : offset + n].view(t.shape).to(t.device).clone()
            offset += n
    return out


# =============================================================================================
# transformer blocks


def find_transformer_blocks(model: LoraModel | fx.GraphModule, pattern: str | None = None) -> list[str]:
    """Module paths of the repeated blocks of a traced model, in graph order.

    By default: the children of every outermost "indexed" module (all child names are integers,
    like an ``nn.ModuleList``: ``model.layers.<i>``, ``encoder.layer.<i>``, ``transformer.h.<i>``)
    that the graph runs code in. Only the outermost ones: MoE experts inside a block stay in the block.
    graphlora's own trees (``graphlora_*``) are skipped. ``pattern``: a regex that must
    ``fullmatch`` the module paths to take instead (e.g. ``r"model\\.layers\\.\\d+"``).
    """
    gm = model.graph_module if isinstance(model, LoraModel) else model
    names = {name for name, _ in gm.named_modules() if name and not name.startswith("graphlora_")}
    if pattern is not None:
        rx = re.compile(pattern)
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
            if child is not None and not path.startswith("graphlora_"):
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
        path = _node_path(node)
        while path:
            order.setdefault(path, i)
            path = path.rpartition(".")[0]
    return order


def _node_path(node: fx.Node) -> str | None:
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
    info = node.meta.get("graphlora") or {}
    return info.get("module_path")


# =============================================================================================
# splitting the flat graph into per-block calls


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
        path = _node_path(node)
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


def _split_graph(flat: fx.Graph, blocks: Sequence[str], containers: Mapping[str, Sequence[str]]) -> _Split:
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
            call.meta["graphlora_block"] = block
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


def _noop_forward(*args: Any, **kwargs: Any) -> None:
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
        split = _split_graph(gm.graph, self.blocks, self.containers)
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
    state: _ShardedExecution | None = self.__dict__.get(_STATE_ATTR)
    if state is None or state.owner() is not self:
        return type(self).forward(self, *args, **kwargs)
    if self.code is not state.code:
        state.rebuild(self)
    return state.root_fn(self, *args, **kwargs)


# =============================================================================================
# FSDP2


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`shard_lora_model` was applied (the GraphModule runs block by block)."""
    gm = getattr(unwrap_model(model), "graph_module", None)
    return gm is not None and _STATE_ATTR in gm.__dict__


def sharded_blocks(model: nn.Module) -> list[str]:
    """The block paths a sharded model runs as FSDP units ([] when not sharded)."""
    gm = unwrap_model(model).graph_module
    state = gm.__dict__.get(_STATE_ATTR)
    return list(state.blocks) if state is not None else []


def shard_lora_model(
    model: LoraModel,
    *,
    mesh: Any = None,
    blocks: Sequence[str] | str | None = None,
    reshard_after_forward: bool | int | None = None,
    mp_policy: Any = None,
    offload_policy: Any = None,
    shard_frozen: bool = True,
) -> LoraModel:
    """Apply FSDP2 ``fully_shard`` to every transformer block of ``model`` and to the model.

    ``blocks``: module paths (default :func:`find_transformer_blocks`) or a regex fullmatching
    them. Each block becomes one FSDP group together with its LoRA factors (all adapters the
    model has now); the model itself is the root group (embeddings, final norm, head and LoRA on
    sites outside blocks). ``mesh``, ``reshard_after_forward``, ``mp_policy`` and
    ``offload_policy`` are passed to ``fully_shard``. Frozen float weights are sharded too
    (that is the memory saving); ``shard_frozen=False`` keeps them replicated and unmanaged, so
    FSDP only shards and all-gathers LoRA factors. Integer (packed) tensors are never sharded.

    Returns ``model`` (now also an ``FSDPModule``); train it as usual — its parameters are
    ``DTensor`` shards, so build the optimizer after this call. Add adapters before sharding;
    switching between them afterwards works.
    """
    _require_initialized("shard_lora_model()")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise DistributedError("shard_lora_model() takes the LoraModel itself, not a DDP wrapper: use one of DDP or FSDP")
    model = unwrap_model(model)
    gm = model.graph_module
    if _STATE_ATTR in gm.__dict__:
        raise DistributedError("this model is already sharded (shard_lora_model() was applied)")
    from torch.distributed.fsdp import fully_shard

    paths = find_transformer_blocks(model, blocks) if (blocks is None or isinstance(blocks, str)) else list(blocks)
    if not paths:
        raise DistributedError(
            "found no transformer blocks to shard (no module with integer-named children such as "
            "model.layers.0); pass blocks=[module paths] or a regex"
        )
    _check_block_paths(gm, paths)
    containers = _adapter_containers(gm, paths)
    # validate the split before touching the model, so a failure leaves it unsharded
    _split_graph(gm.graph, paths, containers)

    given = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy,
        "offload_policy": offload_policy,
        "ignored_params": _ignored_parameters(model, shard_frozen) or None,
    }
    options = {k: v for k, v in given.items() if v is not None}  # fully_shard's own defaults otherwise
    for path in paths:
        group = [gm.get_submodule(path)] + [gm.get_submodule(c) for c in containers[path]]
        for c in containers[path]:
            gm.get_submodule(c).__dict__["forward"] = _noop_forward
        fully_shard(group if len(group) > 1 else group[0], **options)
    fully_shard(model, **options)

    gm.__dict__[_STATE_ATTR] = _ShardedExecution(gm, paths, containers)
    gm.__dict__["forward"] = types.MethodType(_sharded_forward, gm)
    return model


def _check_block_paths(gm: fx.GraphModule, paths: Sequence[str]) -> None:
    names = dict(gm.named_modules())
    missing = [p for p in paths if p not in names]
    if missing:
        raise DistributedError(
            f"block path(s) {', '.join(missing[:5])} are not modules of the traced graph; module "
            "paths look like 'model.layers.0' (see find_transformer_blocks)"
        )
    nested = [(a, b) for a in paths for b in paths if a != b and b.startswith(a + ".")]
    if nested:
        raise DistributedError(f"blocks must not nest: {nested[0][1]!r} is inside {nested[0][0]!r}")
    if len(set(paths)) != len(paths):
        raise DistributedError("the same block path is given twice")


def _adapter_containers(gm: fx.GraphModule, paths: Sequence[str]) -> dict[str, list[str]]:
    """Block path -> the adapter-tree containers holding that block's LoRA factors."""
    root = gm._modules.get(ADAPTERS_ROOT)
    out: dict[str, list[str]] = {p: [] for p in paths}
    if root is None:
        return out
    for adapter in root._modules:
        for p in paths:
            name = f"{ADAPTERS_ROOT}.{adapter}.{p}"
            try:
                gm.get_submodule(name)
            except AttributeError:
                continue
            out[p].append(name)
    return out


def _ignored_parameters(model: LoraModel, shard_frozen: bool) -> set[nn.Parameter]:
    """Parameters FSDP must leave alone: integer (packed) ones always, frozen ones on request."""
    ignored = set()
    for p in model.parameters():
        packed = not (p.dtype.is_floating_point or p.dtype.is_complex)
        if packed or (not shard_frozen and not p.requires_grad):
            ignored.add(p)
    return ignored


# =============================================================================================
# DDP


def wrap_ddp(model: LoraModel, *, sync_buffers: bool = False, **ddp_kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model, ...)`` with checks and one changed default.

    DDP needs nothing special for a LoraModel: it buckets only ``requires_grad`` parameters (the
    LoRA factors) and every factor of the active adapters is used in every forward, so
    ``find_unused_parameters`` is not needed. ``sync_buffers=False`` by default: a quantized base
    lives in buffers (packed weights, scales) that are identical on all ranks, and re-sending them
    from rank 0 before every forward would move the whole base model each step. DDP still copies
    rank 0's parameters and buffers once when it is built. Other keyword arguments go to DDP.
    """
    _require_initialized("wrap_ddp()")
    model = unwrap_model(model)
    if is_sharded(model):
        raise DistributedError("this model is sharded with FSDP (shard_lora_model); do not also wrap it in DDP")
    if not any(p.requires_grad for p in model.parameters()):
        raise DistributedError(
            "the model has no trainable (LoRA) parameter: activate an adapter (model.set_adapter) "
            "before wrapping it in DistributedDataParallel"
        )
    if "broadcast_buffers" not in ddp_kwargs and "forward_sync_buffers" not in ddp_kwargs:
        params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        # torch >= 2.13 spells it forward_sync_buffers (broadcast_buffers is deprecated there)
        key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        ddp_kwargs[key] = sync_buffers
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def ddp_bucket_parameter_names(ddp: nn.parallel.DistributedDataParallel) -> list[list[str]]:
    """Parameter names (of ``ddp.module``) in each of DDP's gradient buckets, to check that only
    LoRA factors are synchronised."""
    names = {id(p): n for n, p in ddp.module.named_parameters()}
    return [[names.get(id(p), "<unnamed>") for p in bucket.parameters()] for bucket in ddp.reducer._get_zeros_like_grad_buckets()]


# =============================================================================================
# gathering and saving


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _sharded_parameters(model: LoraModel, lora_only: bool) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(owner module, name, parameter) of every DTensor parameter, in module order (the same on
    every rank, which the gathers rely on). ``lora_only``: just the adapter tree."""
    root = model.graph_module
    out = []
    seen: set[int] = set()
    for path, module in root.named_modules():
        if lora_only and not (path == ADAPTERS_ROOT or path.startswith(ADAPTERS_ROOT + ".")):
            continue
        for name, p in module._parameters.items():
            if p is not None and _is_dtensor(p) and id(p) not in seen:
                seen.add(id(p))
                out.append((module, name, p))
    return out


@contextlib.contextmanager
def _full_parameters(model: LoraModel, *, lora_only: bool, keep: bool) -> Iterator[None]:
    """Gather every sharded parameter (a collective on all ranks, one tensor at a time) and, where
    ``keep``, register the full tensors in place of the shards until the block exits."""
    _reshard_all(model)
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module, name, p in _sharded_parameters(model, lora_only):
            full = p.full_tensor().detach()
            if keep:
                module._parameters[name] = nn.Parameter(full, requires_grad=p.requires_grad)
                swapped.append((module, name, p))
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def _reshard_all(model: nn.Module) -> None:
    """Put every FSDP group into its sharded state (the root stays gathered after a forward, and
    ``state_dict()`` would reshard it mid-save), so the gathers see one consistent layout."""
    fsdp_cls = _fsdp_module_class()
    if fsdp_cls is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp_cls):
            module.reshard()


def gather_lora_state_dict(model: nn.Module, adapter: str | None = None, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Full (unsharded) LoRA weights under PEFT names, from a plain, DDP or FSDP-sharded model.

    A collective when the model is sharded: call it on every rank. ``rank0_only=True`` returns
    an empty dict on other ranks (they still take part in the gathers).
    """
    lora = unwrap_model(model)
    keep = not rank0_only or _rank() == 0
    with _full_parameters(lora, lora_only=True, keep=keep):
        if not keep:
            return {}
        return {k: v.detach().clone() for k, v in lora.lora_state_dict(adapter).items()}


def save_on_rank0(model: nn.Module, save_directory: Any, *, group: Any = None, **save_options: Any) -> Any:
    """``model.save_pretrained(save_directory, **save_options)`` on rank 0 only, from any rank.

    Sharded tensors are gathered first (all ranks take part): just the LoRA factors for
    ``only_save_adapters=True``, every parameter for the base-and-adapter and merged layouts.
    All ranks then wait until rank 0 finished writing, and every rank returns rank 0's result
    (a :class:`graphlora.io.lora_io.SaveResult`). If rank 0 fails, rank 0 raises its error and
    the other ranks raise :class:`DistributedError` instead of hanging. Without a process group
    this is ``model.save_pretrained``.
    """
    lora = unwrap_model(model)
    if not is_initialized():
        return lora.save_pretrained(save_directory, **save_options)
    is_zero = dist.get_rank(group) == 0
    error: BaseException | None = None
    result: Any = None
    with _full_parameters(lora, lora_only=bool(save_options.get("only_save_adapters")), keep=is_zero):
        if is_zero:
            try:
                with _plain_module_tree(lora.graph_module):
                    result = lora.save_pretrained(save_directory, **save_options)
            except Exception as exc:  # noqa: BLE001 - reported to the other ranks below, then re-raised
                error = exc
    outcome = [None if error is None else f"{type(error).__name__}: {error}", result]
    dist.broadcast_object_list(outcome, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise DistributedError(f"rank 0 failed to save to {save_directory}: {outcome[0]}")
    return outcome[1]


def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


@contextlib.contextmanager
def _plain_module_tree(gm: fx.GraphModule) -> Iterator[None]:
    """Temporarily replace FSDP-managed submodules by plain look-alikes sharing their tensors.

    FSDP modules refuse ``deepcopy``, which ``LoraModel.merge`` (merged saves) relies on. The
    look-alikes have the original class, tensors and children but no FSDP state or hooks.
    """
    fsdp_cls = _fsdp_module_class()
    if fsdp_cls is None:
        yield
        return
    original = dict(gm._modules)
    try:
        for name, child in original.items():
            if child is not None:
                gm._modules[name] = _plain(child, fsdp_cls)
        yield
    finally:
        gm._modules.clear()
        gm._modules.update(original)


def _plain(module: nn.Module, fsdp_cls: type) -> nn.Module:
    """``module`` itself when no FSDP module is inside it, else a plain shell (see above)."""
    children = {k: (None if c is None else _plain(c, fsdp_cls)) for k, c in module._modules.items()}
    if not isinstance(module, fsdp_cls) and all(children[k] is module._modules[k] for k in children):
        return module
    cls = next(c for c in type(module).__mro__ if not issubclass(c, fsdp_cls))
    shell = cls.__new__(cls)
    nn.Module.__init__(shell)
    for key, value in module.__dict__.items():
        if key not in shell.__dict__ and not key.startswith("_") and key != "forward":
            shell.__dict__[key] = value  # plain settings such as in_features
    shell.training = module.training
    shell._parameters.update(module._parameters)
    shell._buffers.update(module._buffers)
    shell._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    shell._modules.update(children)
    return shell
