"""Dequantized weights are recomputed in backward, not kept from forward.

A QLoRA base is stored as codes, but each linear layer computes with its dequantized float
weight, and autograd keeps that weight for the backward of the layer's input (``dx = dy @ W``):
after a forward, the whole float base is alive again, every layer's copy waiting for backward.
bitsandbytes avoids this by dequantizing again inside its backward; this module does the same
for any graph, as an execution rewrite:

* :func:`recomputing_copy` runs ``gm``'s graph with every node that computes a weight from the
  frozen quantized storage alone (the dequantize node, and what is made of it: casts, transposes,
  the concatenation of sibling weights) called through :class:`_Recorded`;
* fused execution concatenates sibling weights with :data:`weight_cat`, which records the same way;
* :func:`recompute_saved_weights` is the context the forward runs in: while it is active, those
  calls note how to remake their output, and a ``saved_tensors_hooks`` pack hook stores such a
  recipe instead of a tensor autograd saves from them (a view is remade as the same view).

The arithmetic is unchanged (the same ops on the same codes give the same weight, bit for bit),
so gradients are those of the graph without it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from graphlora import meta

__all__ = ["has_quantized_weights", "recompute_saved_weights", "recomputing_copy", "weight_cat"]

_ACTIVE: list[dict[int, tuple[Any, Callable[[], torch.Tensor]]]] = []


def has_quantized_weights(gm: fx.GraphModule) -> bool:
    return any(meta.role(n) == "dequant" for n in gm.graph.nodes)


class _Recorded:
    """A call of ``target`` whose tensor inputs are constants or outputs of recorded calls."""

    def __init__(self, target: Callable, name: str):
        self.target = target
        self.__name__ = f"recorded_{name}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.target(*args, **kwargs)
        if _ACTIVE and isinstance(out, torch.Tensor) and not out.requires_grad:
            registry = _ACTIVE[-1]
            recipe_args = [_recipe_of(a, registry) for a in args]
            recipe_kwargs = {k: _recipe_of(v, registry) for k, v in kwargs.items()}
            target = self.target

            def remake() -> torch.Tensor:
                return target(*[_remade(a) for a in recipe_args], **{k: _remade(v) for k, v in recipe_kwargs.items()})

            registry[_key(out)] = (weakref.ref(out), remake)
        return out


#: ``torch.cat`` of weights (the sibling fusion's concatenated q/k/v or gate/up weight), remade in
#: backward from its parts like a graph node's output.
weight_cat = _Recorded(torch.cat, "weight_cat")


class _Remake:
    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.fn = fn


def _recipe_of(value: Any, registry: dict) -> Any:
    if isinstance(value, torch.Tensor):
        entry = registry.get(_key(value))
        if entry is not None and entry[0]() is value:
            return _Remake(entry[1])
        return value  # a constant: the quantized storage itself (kept anyway)
    if isinstance(value, (list, tuple)):
        return type(value)(_recipe_of(v, registry) for v in value)
    return value


def _remade(value: Any) -> Any:
    if isinstance(value, _Remake):
        return value.fn()
    if isinstance(value, (list, tuple)):
        return type(value)(_remade(v) for v in value)
    return value


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def recomputing_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s tensors whose weight-only computations are recorded calls."""
    import copy
    import warnings

    graph = fx.Graph(owning_module=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        graph._codegen = copy.deepcopy(gm.graph._codegen)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    frozen = {n.name for n in graph.nodes if n.op == "get_attr" and not _trainable(gm, str(n.target))}
    weight_only: set[str] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        inputs = node.all_input_nodes
        from_storage = meta.role(node) == "dequant" or (inputs and any(i.name in weight_only for i in inputs))
        if from_storage and inputs and all(i.name in weight_only or i.name in frozen for i in inputs):
            weight_only.add(node.name)
            node.target = _Recorded(node.target, node.name)
    copied = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copied.meta = gm.meta
    inner = copied.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with recompute_saved_weights():
            return inner(*args, **kwargs)

    copied.forward = forward  # type: ignore[method-assign]
    return copied


def _trainable(gm: fx.GraphModule, name: str) -> bool:
    try:
        value = gm.get_parameter(name)
    except AttributeError:
        return False
    return bool(value.requires_grad)


@contextlib.contextmanager
def recompute_saved_weights():
    """Run a forward whose saved dequantized weights are remade in backward (see the module)."""
    registry: dict[int, tuple[Any, Callable[[], torch.Tensor]]] = {}

    def pack(t: torch.Tensor) -> Any:
        entry = registry.get(_key(t)) if t.device.type != "meta" else None
        if entry is None:
            return t
        base = entry[0]()
        if base is None or base.dtype != t.dtype:  # gone (its storage is another tensor's now), or reinterpreted
            return t
        return _Remake(entry[1]), tuple(t.size()), tuple(t.stride()), t.storage_offset() - base.storage_offset()

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        remake, size, stride, offset = packed
        base = remake.fn()
        return base.as_strided(size, stride, base.storage_offset() + offset)

    _ACTIVE.append(registry)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _ACTIVE.remove(registry)
        registry.clear()
