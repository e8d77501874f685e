"""Switch train/eval behaviour inside a traced graph.

``torch.export`` bakes ``module.training`` into the graph as constant arguments (for example
``aten.dropout(x, 0.1, False)``) and its GraphModules refuse ``train()``. graphlora traces in eval
mode and flips those arguments instead: every op whose schema has a ``train``/``training``
argument (dropout in all its forms, batch norm) follows the mode, LoRA dropout included.
Behaviour a model decides in Python from ``self.training`` (e.g. the attention-probability
dropout transformers passes to SDPA) is fixed at trace time and stays as traced.
"""

from __future__ import annotations

import torch
import torch.fx as fx

_FLAG_NAMES = ("train", "training")


def _flag_position(target) -> tuple[int, str] | None:
    schema = getattr(target, "_schema", None)
    if schema is None:
        return None
    for i, arg in enumerate(schema.arguments):
        if arg.name in _FLAG_NAMES and str(arg.type) == "bool":
            return i, arg.name
    return None


def set_training_flags(gm: fx.GraphModule, mode: bool) -> bool:
    """Set the train/training argument of every op that has one; True when anything changed."""
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        pos = _flag_position(node.target)
        if pos is not None:
            index, name = pos
            if name in node.kwargs:
                if node.kwargs[name] != mode:
                    node.update_kwarg(name, mode)
                    changed = True
            elif index < len(node.args):
                if node.args[index] != mode:
                    node.update_arg(index, mode)
                    changed = True
            else:
                node.update_kwarg(name, mode)
                changed = True
        elif "training" in node.kwargs and isinstance(node.kwargs["training"], bool):
            # torch-level functions in symbolic traces, e.g. F.dropout(x, p, training=False)
            if node.kwargs["training"] != mode:
                node.update_kwarg("training", mode)
                changed = True
    if changed:
        gm.recompile()
    return changed


def set_module_flags(module: torch.nn.Module, mode: bool) -> None:
    """Set ``.training`` on every submodule without calling their ``train()`` (export refuses)."""
    for m in module.modules():
        m.training = mode
