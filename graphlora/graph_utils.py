"""Small FX helpers shared by passes: registering tensors, inserting nodes with shape metadata.

Inserted nodes get ``node.meta["val"]`` computed on fake tensors from their inputs' metadata, so
graph text, diffs and later passes see shapes for new nodes exactly as for traced ones. Graphs
without fake metadata (a symbolic trace without example inputs) simply get no shapes.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from graphlora import meta


#: graphlora's own attributes of a GraphModule (adapters, quantized storage, encodings, observers)
#: all start with this, so what is the user's model and what is graphlora's is told by name.
OWN_PREFIX = "graphlora_"


def is_own(name: str) -> bool:
    """Whether a qualified attribute name belongs to graphlora rather than to the user's model."""
    return name.startswith(OWN_PREFIX)


class Container(nn.Module):
    """An empty module used to build dotted attribute paths (``adapters.default.q_proj``)."""


def ensure_container(root: nn.Module, path: str) -> nn.Module:
    """Return the submodule at dotted ``path``, creating empty containers along the way."""
    module = root
    if not path:
        return module
    for part in path.split("."):
        child = module._modules.get(part)
        if child is None:
            if part in module._parameters or part in module._buffers:
                raise ValueError(f"cannot create container {path!r}: {part!r} is a tensor")
            child = Container()
            module.add_module(part, child)
        module = child
    return module


def set_tensor(root: nn.Module, qualname: str, tensor: torch.Tensor, *, parameter: bool) -> None:
    """Register ``tensor`` at dotted ``qualname`` as a parameter or (persistent) buffer."""
    head, _, leaf = qualname.rpartition(".")
    owner = ensure_container(root, head)
    owner._parameters.pop(leaf, None)
    owner._buffers.pop(leaf, None)
    if parameter:
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=tensor.requires_grad)
        owner.register_parameter(leaf, tensor)
    else:
        owner.register_buffer(leaf, tensor)


def get_tensor(root: nn.Module, qualname: str) -> torch.Tensor:
    head, _, leaf = qualname.rpartition(".")
    owner = root.get_submodule(head) if head else root
    if leaf in owner._parameters:
        return owner._parameters[leaf]
    if leaf in owner._buffers:
        return owner._buffers[leaf]
    return getattr(owner, leaf)


def delete_tensor(root: nn.Module, qualname: str) -> None:
    head, _, leaf = qualname.rpartition(".")
    owner = root.get_submodule(head) if head else root
    owner._parameters.pop(leaf, None)
    owner._buffers.pop(leaf, None)


def share_storage_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """Copy a GraphModule (graph and module tree) while sharing every tensor with the original.

    Passes may then rewrite the copy's graph and re-register its tensors (a merge, an export's
    preparation) without touching the original or duplicating its weights.
    """
    memo: dict[int, Any] = {}
    for t in list(gm.parameters()) + list(gm.buffers()):
        memo[id(t)] = t
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation notice
        return copy.deepcopy(gm, memo)


def fake_mode(gm: fx.GraphModule):
    """The FakeTensorMode of the graph's shape metadata, or None."""
    from torch._guards import detect_fake_mode

    vals = [n.meta["val"] for n in gm.graph.nodes if "val" in n.meta]
    try:
        return detect_fake_mode(vals)
    except Exception:
        return None


def propagate_val(node: fx.Node, mode) -> None:
    """Compute ``node.meta["val"]`` from its inputs' values on fake tensors."""
    if mode is None:
        return
    if node.op == "get_attr":
        tensor = get_tensor(node.graph.owning_module, node.target)
        with mode:
            node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
        return
    if node.op != "call_function":
        return

    def val(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    args = fx.node.map_aggregate(node.args, val)
    kwargs = fx.node.map_aggregate(node.kwargs, val)
    if any(
        isinstance(a, fx.Node) and "val" not in a.meta for a in node.all_input_nodes
    ):
        return
    try:
        with mode:
            node.meta["val"] = node.target(*args, **kwargs)
    except Exception:
        node.meta.pop("val", None)


def insert_call(
    graph: fx.Graph,
    target: Callable,
    args: tuple,
    kwargs: dict[str, Any] | None = None,
    *,
    role: str | None = None,
    mode=None,
    val_like: fx.Node | None = None,
    val: Any = None,
    **fields: Any,
) -> fx.Node:
    """Create a ``call_function`` node at the current insertion point, tagged and shaped.

    ``val_like``: a node whose output has exactly this node's shape, dtype and device; its fake
    value is reused instead of dispatching the op on fake tensors (which costs ~1 ms a node with
    symbolic shapes — too much for hundreds of sites). ``val``: the fake value itself.
    """
    node = graph.call_function(target, args, kwargs or {})
    if role is not None:
        meta.tag(node, role, **fields)
    if val is not None:
        node.meta["val"] = val
    elif val_like is not None and "val" in val_like.meta:
        node.meta["val"] = val_like.meta["val"]
    else:
        propagate_val(node, mode)
    return node


def insert_get_attr(graph: fx.Graph, qualname: str, *, role: str | None = None, mode=None, **fields: Any) -> fx.Node:
    node = graph.get_attr(qualname)
    if role is not None:
        meta.tag(node, role, **fields)
    propagate_val(node, mode)
    return node


def copy_stack(src: fx.Node, *dst: fx.Node) -> None:
    """Give inserted nodes the module stack of the node they belong to (for diffs and ONNX names)."""
    stack = src.meta.get("nn_module_stack")
    if stack is None:
        return
    for d in dst:
        d.meta["nn_module_stack"] = dict(stack)


def evaluate(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """Compute the value of a node that depends only on module tensors (no graph inputs).

    Used to read "the weight a site computes with" whatever chain of dequantize/transpose ops
    produces it, without running the whole model.
    """
    cache: dict[fx.Node, Any] = {}

    def run(n: fx.Node):
        if n in cache:
            return cache[n]
        if n.op == "get_attr":
            value = get_tensor(gm, n.target)
        elif n.op == "call_function":
            args = fx.node.map_arg(n.args, run)
            kwargs = fx.node.map_arg(n.kwargs, run)
            value = n.target(*args, **kwargs)
        elif n.op == "call_method":
            args = fx.node.map_arg(n.args, run)
            kwargs = fx.node.map_arg(n.kwargs, run)
            value = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"node {n.name} depends on graph input {n.name!r}; not a constant")
        cache[n] = value
        return value

    with torch.no_grad():
        return run(node)


def erase_unused_chain(nodes) -> int:
    """Erase ``nodes`` that lost their last user, and whatever only they fed, transitively.

    Passes that rewire a weight clean up exactly what they disconnected, never unrelated dead
    code the tracer left (which would show up in their graph diff).
    """
    removed = 0
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if getattr(node, "_erased", False) or node.users or node.op not in ("get_attr", "call_function", "call_method"):
            continue
        if node.op != "get_attr" and node.is_impure():
            continue
        inputs = list(node.all_input_nodes)
        node.graph.erase_node(node)
        removed += 1
        stack.extend(inputs)
    return removed


def remove_dead_nodes(gm: fx.GraphModule) -> int:
    """Erase side-effect-free nodes whose results nobody uses (after rewiring a weight, say)."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.users or node.op not in ("get_attr", "call_function", "call_method"):
            continue
        if node.op != "get_attr" and node.is_impure():
            continue
        gm.graph.erase_node(node)
        removed += 1
    return removed


def add_keyword_input(gm: fx.GraphModule, name: str, val: Any = None) -> fx.Node:
    """Give a traced GraphModule (``torch.export``'s pytree calling convention) one more keyword
    input ``name``, after its others; ``val`` is the new placeholder's fake value. Returns the
    placeholder. Used for inputs graphlora adds to a graph, such as the row gates of a
    mixed-adapter batch."""
    import torch.utils._pytree as pytree
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    codegen = gm.graph._codegen
    if not isinstance(codegen, _PyTreeCodeGen):
        raise ValueError("add_keyword_input needs a graph traced by torch.export")
    info = codegen.pytree_info
    args, kwargs = pytree.tree_unflatten([0] * info.in_spec.num_leaves, info.in_spec)
    spec = pytree.tree_structure((args, {**kwargs, name: 0}))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(name)
    if val is not None:
        node.meta["val"] = val
    codegen.pytree_info = _PyTreeInfo([*info.orig_args, name], spec, info.out_spec)
    gm.recompile()
    return node
