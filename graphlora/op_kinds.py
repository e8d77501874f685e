"""What each op of a traced graph is, for whole-graph activation quantization: its kind, the module
it ran in, and the name its output goes by.

Kinds (:data:`OP_KINDS`) are what a fully integer deployment quantizes the outputs of —

=============  ===============================================================================
``linear``     a linear site (``nn.Linear``, ``Conv1D``, ``F.linear``, ``addmm``...)
``matmul``     a product of two activations (``matmul``, ``bmm``, ``mm`` with no weight)
``attention``  ``scaled_dot_product_attention`` (its softmax and products are inside the op;
               trace with ``attn_implementation="eager"`` to see them as ``matmul``/``softmax``)
``add``        a sum of two activations (residual connections)
``mul``        a product of two activations (gated MLPs)
``norm``       LayerNorm, RMSNorm, GroupNorm, BatchNorm
``activation`` GELU, ReLU, SiLU, tanh, sigmoid, ...
``softmax``    softmax, log-softmax
``embedding``  an embedding lookup
=============  ===============================================================================

— and only float outputs count (mask arithmetic on integers or booleans is not an activation).

A tensor is named after the module that computed it, as AIMET's torch encodings file does: the
output of a leaf module (``nn.LayerNorm``, ``nn.GELU``, ``nn.Linear``, ``nn.Embedding``) is
``<module>.output``; an op a module's ``forward`` runs itself (the residual add in BERT's
``BertSelfOutput``) is ``<module>.<kind>``, numbered in graph order when the module runs several of
that kind (``<module>.add_1``). Module paths come from ``nn_module_stack``, which
``torch.export`` records on every node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from graphlora import meta
from graphlora.sites import _normalise_stack_path

OP_KINDS = ("linear", "matmul", "attention", "add", "mul", "norm", "activation", "softmax", "embedding")

_ATEN = torch.ops.aten


def _overloads(*packets) -> set:
    out = set()
    for packet in packets:
        for name in packet.overloads():
            out.add(getattr(packet, name))
    return out


_BY_KIND = {
    "linear": _overloads(_ATEN.linear, _ATEN.addmm),
    "matmul": _overloads(_ATEN.matmul, _ATEN.bmm, _ATEN.mm, _ATEN.baddbmm),
    "attention": _overloads(_ATEN.scaled_dot_product_attention),
    "add": _overloads(_ATEN.add),
    "mul": _overloads(_ATEN.mul),
    "norm": _overloads(_ATEN.layer_norm, _ATEN.rms_norm, _ATEN.group_norm, _ATEN.batch_norm),
    "activation": _overloads(_ATEN.gelu, _ATEN.relu, _ATEN.silu, _ATEN.tanh, _ATEN.sigmoid,
                             _ATEN.hardswish, _ATEN.leaky_relu, _ATEN.elu, _ATEN.mish,
                             _ATEN.hardtanh),
    "softmax": _overloads(_ATEN.softmax, _ATEN._softmax, _ATEN.log_softmax, _ATEN._log_softmax),
    "embedding": _overloads(_ATEN.embedding),
}
_KIND_OF = {op: kind for kind, ops in _BY_KIND.items() for op in ops}
#: kinds whose op takes two activations: with a constant or a parameter operand, it is not one
_BINARY = ("add", "mul", "matmul")


@dataclass(frozen=True)
class GraphOp:
    """One op whose output whole-graph quantization may observe."""

    node: fx.Node
    kind: str
    module_path: str
    tensor: str  # the output's name


def module_of(node: fx.Node) -> str:
    """The innermost module path a node ran in (``""`` for the root module)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return _normalise_stack_path(list(stack.values())[-1][0])


def _float_output(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def _is_activation(arg) -> bool:
    return isinstance(arg, fx.Node) and arg.op != "get_attr" and _float_output(arg)


def op_kind(node: fx.Node) -> str | None:
    """The kind of ``node`` (one of :data:`OP_KINDS`), or None for ops that are not quantized on
    their own (shape ops, dropout, graphlora's own nodes, integer arithmetic)."""
    if node.op != "call_function":
        return None
    if meta.role(node) == "base":  # a site: an embedding is still an embedding; conv/experts have no kind
        site = meta.info(node).get("site")
        kind = site.site_kind if site is not None else "linear"
        return {"linear": "linear", "einsum": "linear", "embedding": "embedding"}.get(kind)
    if meta.role(node) is not None:
        return None
    kind = _KIND_OF.get(node.target)
    if kind is None or not _float_output(node):
        return None
    if kind in _BINARY and sum(_is_activation(a) for a in node.args[:2]) < 2:
        return None
    return kind


def graph_ops(gm: fx.GraphModule) -> list[GraphOp]:
    """Every op of ``gm`` with a kind, in graph order, with its output's name.

    A linear site's output is its last LoRA ``add`` when it has LoRA branches (the module's
    output is base plus LoRA), its base op otherwise; a second use of a module is ``path#1``.
    """
    from graphlora.branches import branches_by_site

    adds = {key: brs[-1].add for key, brs in branches_by_site(gm).items()}
    all_paths = {_normalise_stack_path(path) for n in gm.graph.nodes
                 for path, _ in (n.meta.get("nn_module_stack") or {}).values()}
    found = []
    for n in gm.graph.nodes:
        kind = op_kind(n)
        if kind is None:
            continue
        path = module_of(n)
        if kind == "linear" and "site" in meta.info(n):
            path = meta.info(n)["site"].key
            n = adds.get(path, n)
        found.append((n, kind, path))
    leaf = {p for _, _, p in found if p and not any(q.startswith(p.split("#")[0] + ".") for q in all_paths)}
    last_in_leaf = {p: n for n, _, p in found if p in leaf}  # a leaf module's output: its last op
    counts: dict[tuple[str, str], int] = {}
    out = []
    for n, kind, path in found:
        if path in leaf and last_in_leaf[path] is n:
            tensor = f"{path}.output"
        else:
            i = counts.get((path, kind), 0)
            counts[(path, kind)] = i + 1
            stem = f"{path}.{kind}" if path else kind
            tensor = stem if i == 0 else f"{stem}_{i}"
        out.append(GraphOp(n, kind, path, tensor))
    return out
