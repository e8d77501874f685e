"""Finding the transformer blocks of a traced model: the units FSDP shards.

A traced graph keeps the original module tree (``graph_module.named_modules()``) and records in
every node the module it ran in, so the blocks of the original model are found from the module
tree and ordered by where the graph first runs code in them.
"""

from __future__ import annotations

from torch import fx, nn

from graphlora import meta
from graphlora.errors import InputError
from graphlora.graph_utils import is_own
from graphlora.model import LoraModel
from graphlora.patterns import PatternSet

__all__ = ["find_transformer_blocks", "node_path"]


def find_transformer_blocks(model: LoraModel | fx.GraphModule, pattern: str | None = None) -> list[str]:
    """Module paths of the repeated blocks of a traced model, in graph order.

    By default: the children of every outermost "indexed" module (all child names are integers,
    like an ``nn.ModuleList``: ``model.layers.<i>``, ``encoder.layer.<i>``, ``transformer.h.<i>``)
    that the graph runs code in. Only the outermost ones: MoE experts inside a block stay in the block.
    graphlora's own trees (``graphlora_*``) are skipped. ``pattern``: a regex that must
    ``fullmatch`` the module paths to take instead (e.g. ``r"model\\.layers\\.\\d+"``).
    """
    gm = model.graph_module if isinstance(model, LoraModel) else model
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
