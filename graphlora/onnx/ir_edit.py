"""Reading and rewiring an ``onnx_ir`` graph: the small vocabulary every lowering module shares.

Constants, attributes and readable names of a node; fresh initializer and node names; replacing a
value everywhere (a graph output keeps its name); dropping what nobody reads. Nothing here knows
quantization.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphlora.errors import ExportError


def is_op(node: ir.Node, op_type: str) -> bool:
    """``node`` is the standard-domain ``op_type``."""
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


def where(node: ir.Node) -> str:
    """A name for ``node`` in error messages."""
    return node.name or (node.outputs[0].name if node.outputs else node.op_type)


def attr(node: ir.Node, name: str, default=None):
    """The value of attribute ``name`` of ``node``, or ``default`` when it is absent."""
    found = node.attributes.get(name)
    return default if found is None else found.value


def const(value: ir.Value | None) -> np.ndarray | None:
    """The array of a constant value (an initializer), None for a computed one or no value."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        return None
    return tensor.numpy()


def require_const(node: ir.Node, index: int, what: str) -> np.ndarray:
    """Input ``index`` of ``node`` as an array; it must be a constant (a model buffer)."""
    value = node.inputs[index] if index < len(node.inputs) else None
    array = const(value)
    if array is None:
        raise ExportError(
            f"graphlora::{node.op_type} ({where(node)}): its {what} must be a constant (a model "
            f"buffer), but it is computed in the graph; export cannot store it quantized"
        )
    return array


def optional_const(node: ir.Node, index: int, what: str) -> np.ndarray | None:
    """Input ``index`` of ``node`` as an array, None when the optional input is absent."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        return None
    return require_const(node, index, what)


def base_name(node: ir.Node, x_name: str | None = None) -> str:
    """A readable initializer name: the parameter's name from the buffer names."""
    name = x_name or (node.inputs[0].name if node.inputs and node.inputs[0] is not None else "w")
    for prefix in ("graphlora_quant.weight.", "graphlora_quant.", "graphlora_export."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    last = name.rsplit(".", 1)
    if len(last) == 2 and last[1] in ("packed", "q", "codes", "storage", "x"):
        name = last[0]
    return name


# ----------------------------------------------------------------------------- names
def _unique_initializer_name(graph: ir.Graph, base: str) -> str:
    taken = graph.initializers
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    return name


def add_initializer(graph: ir.Graph, name: str, tensor: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Register ``tensor`` (an array, or an ``onnx_ir`` tensor already typed) as a new
    initializer named ``name`` (suffixed ``_1``, ``_2``... when taken)."""
    if isinstance(tensor, np.ndarray):
        tensor = ir.tensor(tensor)
    tensor.name = _unique_initializer_name(graph, name)
    value = ir.Value(name=tensor.name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


# node names taken so far, per graph being lowered (a set kept across calls: scanning the graph
# for every new node would make lowering quadratic)
_NODE_NAMES: dict[int, set] = {}


def unique_node_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... if a node of ``graph`` already has that name."""
    names = _NODE_NAMES.setdefault(id(graph), {n.name for n in graph})
    name, i = base, 1
    while name in names:
        name = f"{base}_{i}"
        i += 1
    names.add(name)
    return name


def forget_node_names(graph: ir.Graph) -> None:
    """Drop the node names remembered for ``graph`` (at the start and end of a lowering)."""
    _NODE_NAMES.pop(id(graph), None)


# ----------------------------------------------------------------------------- rewiring
def copy_type(src: ir.Value, dst: ir.Value, default: ir.DataType | None = None) -> None:
    """Give ``dst`` the dtype (or ``default``) and shape of ``src``."""
    dtype = src.dtype if src.dtype is not None else default
    if dtype is not None:
        dst.dtype = dtype
    if src.shape is not None:
        dst.shape = src.shape.copy()


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Make every reader of ``old`` read ``new``; a graph output keeps its name."""
    name = old.name
    is_output = old.is_graph_output()
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if is_output and name:
        old.name = f"{name}__replaced"
        new.name = name


def remove_dead(graph: ir.Graph) -> None:
    """Drop nodes whose outputs nobody reads, and unused initializers."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if any(out.uses() or out.is_graph_output() for out in node.outputs):
                continue
            graph.remove(node, safe=True)
            changed = True
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]
