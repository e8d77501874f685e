"""Horizontal fusion of sibling linear ops: one GEMM where several read the same input.

Query, key and value projections read the same activation, and so do their LoRA ``A`` matrices.
Running ``linear(x, cat([Wq, Wk, Wv]))`` once and splitting the result does the same arithmetic
as three calls, but as one larger GEMM — and in backward one ``dx`` GEMM instead of three plus
the additions that accumulate them. Eager PyTorch (and PEFT's module-per-layer design) cannot do
this; a graph pass can.

This is an *execution* optimisation: it is applied to a copy of the graph that
:class:`~graphlora.LoraModel` runs (see ``LoraModel.fuse_siblings``), never to the canonical graph
that other passes, saving and export work on. The weights are concatenated on every forward (a
copy of a few MB), so no tensor is duplicated and training updates are seen immediately — and
that copy costs more than it saves unless the call has many tokens, so the fused group is a call
of :func:`sibling_linears` / :func:`sibling_lora_linears`, which concatenate only when the rows
of this call pay for it (:func:`siblings_pay`) and otherwise run the siblings one by one, exactly
as the canonical graph does.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx

from graphlora import meta
from graphlora.passes.base import GraphPass, PassResult
from graphlora.passes.recompute_weights import weight_cat
from graphlora.passes.fuse_lora import (
    ACTIVATION_PASS_COST,
    LORA_LINEAR,
    WEIGHT_PASS_COST,
    fusion_pays,
    lora_linear_or_branch,
    token_rows,
)

aten = torch.ops.aten


def _plain_linear(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target == aten.linear.default
        and not node.kwargs
        and isinstance(node.args[1], fx.Node)
    )


def siblings_pay(rows: int, in_features: int, outs: list[int], rank: int = 0) -> bool:
    """Whether one GEMM over the concatenated weights of ``len(outs)`` siblings costs less than one
    GEMM each: the concatenation is a pass over every weight; one GEMM saves, in backward, the
    passes that add the siblings' input gradients (and with LoRA, the effective weight must pay
    too: :func:`~graphlora.passes.fuse_lora.fusion_pays`)."""
    saved = rows * in_features * (len(outs) - 1) * ACTIVATION_PASS_COST
    spent = in_features * sum(outs) * WEIGHT_PASS_COST
    return saved > spent and (rank == 0 or fusion_pays(rows, in_features, sum(outs), rank))


def sibling_linears(x: torch.Tensor, weights: list, biases: list | None, always: bool = False) -> tuple:
    """``tuple(linear(x, w, b) for each sibling)``, as one GEMM where :func:`siblings_pay`."""
    sizes = [w.shape[0] for w in weights]
    if always or siblings_pay(token_rows(x), x.shape[-1], sizes):
        bias = torch.cat(biases) if biases is not None else None
        return torch.nn.functional.linear(x, weight_cat(weights), bias).split(sizes, -1)
    linear = torch.nn.functional.linear
    return tuple(linear(x, w, None if biases is None else b) for w, b in zip(weights, biases or weights))


def sibling_lora_linears(x: torch.Tensor, weights: list, biases: list | None, lora_as: list, lora_bs: list,
                         scales: list, always: bool = False) -> tuple:
    """Siblings with LoRA branches: one ``lora_linear`` over the concatenated base weights, the
    stacked ``A`` matrices and a block-diagonal ``B`` (each block pre-scaled) where that pays,
    else each site as :func:`~graphlora.passes.fuse_lora.lora_linear_or_branch` (which decides
    for itself)."""
    sizes = [w.shape[0] for w in weights]
    rank = sum(a.shape[0] for a in lora_as)
    if always or siblings_pay(token_rows(x), x.shape[-1], sizes, rank):
        bias = torch.cat(biases) if biases is not None else None
        block = torch.block_diag(*(b * s for b, s in zip(lora_bs, scales)))
        fused = LORA_LINEAR(x, weight_cat(weights), bias, torch.cat(lora_as), block, 1.0)
        return fused.split(sizes, -1)
    return tuple(lora_linear_or_branch(x, w, None if biases is None else bias, a, b, s, always)
                 for w, bias, a, b, s in zip(weights, biases or weights, lora_as, lora_bs, scales))


def _weight_rows(node: fx.Node) -> int | None:
    val = node.args[1].meta.get("val")
    if val is None or val.dim() != 2:
        return None
    return int(val.shape[0])


class FuseSiblingLinearsPass(GraphPass):
    """Fuse ``aten.linear`` nodes that share their input (base sites and LoRA ``A``s alike)."""

    def __init__(self, always: bool = False) -> None:
        super().__init__()
        self.always = always

    def call(self, gm: fx.GraphModule) -> PassResult:
        groups: dict[tuple, list[fx.Node]] = defaultdict(list)
        for node in gm.graph.nodes:
            if not _plain_linear(node) or _weight_rows(node) is None:
                continue
            has_bias = len(node.args) > 2 and node.args[2] is not None
            kind = "lora" if meta.role(node) == "lora_a" else "base"
            groups[(node.args[0], kind, has_bias)].append(node)
        lora_groups: dict[tuple, list[fx.Node]] = defaultdict(list)
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is lora_linear_or_branch:
                lora_groups[(node.args[0], node.args[2] is not None)].append(node)
        modified = False
        for (x, _, has_bias), nodes in groups.items():
            if len(nodes) < 2:
                continue
            _fuse(gm, x, nodes, has_bias, self.always)
            modified = True
        for (x, has_bias), nodes in lora_groups.items():
            if len(nodes) < 2:
                continue
            _fuse_lora(gm, x, nodes, has_bias, self.always)
            modified = True
        return PassResult(gm, modified)


def _fuse_lora(gm: fx.GraphModule, x: fx.Node, nodes: list[fx.Node], has_bias: bool, always: bool) -> None:
    """Siblings with LoRA: one ``lora_linear`` over the concatenated base weights, the stacked
    ``A`` matrices and a block-diagonal ``B`` (each block pre-scaled), then split."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = sorted(nodes, key=order.__getitem__)
    if not _hoist_operands(graph, nodes, order, (1, 2, 3, 4)):
        return
    sizes = [_rows(n.args[1]) for n in nodes]
    if None in sizes:
        return
    first = nodes[0]
    with graph.inserting_before(first):
        biases = [n.args[2] for n in nodes] if has_bias else None
        parts = graph.call_function(sibling_lora_linears, (
            x, [n.args[1] for n in nodes], biases, [n.args[3] for n in nodes], [n.args[4] for n in nodes],
            [n.args[5] for n in nodes], always))
        pieces = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(nodes))]
    _replace(graph, nodes, pieces)


def _replace(graph: fx.Graph, nodes: list[fx.Node], pieces: list[fx.Node]) -> None:
    for n, piece in zip(nodes, pieces):
        piece.meta.update({k: v for k, v in n.meta.items() if k != "val"})
        n.replace_all_uses_with(piece)
        graph.erase_node(n)


def _rows(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return int(val.shape[0]) if val is not None and val.dim() == 2 else None


def _hoist_operands(graph: fx.Graph, nodes: list[fx.Node], order: dict, positions) -> bool:
    """Move the constant operands (weights) of ``nodes`` above the first of them."""
    first = nodes[0]
    hoist: dict[fx.Node, None] = {}
    for n in nodes:
        for i in positions:
            operand = n.args[i] if i < len(n.args) else None
            if not isinstance(operand, fx.Node):
                continue
            closure = _constant_closure(operand)
            if closure is None:
                return False
            hoist.update(dict.fromkeys(closure))
    for n in sorted(hoist, key=order.__getitem__):
        if order[n] > order[first]:
            first.prepend(n)
    return True


def _constant_closure(node: fx.Node) -> list[fx.Node] | None:
    """``node`` and everything it depends on, if that is only module tensors (no graph input)."""
    seen: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if n.op not in ("get_attr", "call_function"):
            return None
        seen[n] = None
        stack.extend(n.all_input_nodes)
    return list(seen)


def _fuse(gm: fx.GraphModule, x: fx.Node, nodes: list[fx.Node], has_bias: bool, always: bool) -> None:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = sorted(nodes, key=order.__getitem__)
    first = nodes[0]
    # weights (parameter reads, dequantize chains) depend on module tensors only: hoist them
    # above the first sibling so one fused op can read them all
    if not _hoist_operands(graph, nodes, order, (1, 2)):
        return
    with graph.inserting_before(first):
        biases = [n.args[2] for n in nodes] if has_bias else None
        parts = graph.call_function(sibling_linears, (x, [n.args[1] for n in nodes], biases, always))
        pieces = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(nodes))]
    _replace(graph, nodes, pieces)


def _share_input_casts(graph: fx.Graph) -> None:
    """One cast per (input, dtype): mixed-precision branches of sibling sites (q/k/v on a bf16
    base, float32 factors) each cast the same input up; sharing the first cast lets their
    ``A`` matrices read one node, so they fuse like same-precision siblings do."""
    first: dict[tuple, fx.Node] = {}
    for node in list(graph.nodes):
        if meta.role(node) != "lora_cast_in":
            continue
        key = (node.args[0], node.kwargs.get("dtype"))
        if key in first:
            node.replace_all_uses_with(first[key])
            graph.erase_node(node)
        else:
            first[key] = node


def fused_copy(gm: fx.GraphModule, always: bool = False) -> fx.GraphModule:
    """A GraphModule running ``gm``'s graph with its sites fused: each with its LoRA branch, and
    siblings that read one input into one GEMM, whatever op spelled the site in the model.

    The copy references ``gm``'s own submodules and tensors (``fx.GraphModule(root, graph)`` takes
    attributes by reference), so parameters, buffers and observers are shared, not duplicated:
    gradients, optimizer updates and calibration statistics land on the original objects.
    """
    import copy
    import warnings

    graph = fx.Graph(owning_module=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation notice
        graph._codegen = copy.deepcopy(gm.graph._codegen)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    fused = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    fused.meta = gm.meta
    from graphlora.passes.canonical_linear import CanonicalLinearPass
    from graphlora.passes.fuse_lora import FuseLoraLinearPass

    CanonicalLinearPass()(fused)  # every site as aten.linear, the one op the fusions match
    _share_input_casts(fused.graph)
    FuseLoraLinearPass(always)(fused)
    FuseSiblingLinearsPass(always)(fused)
    fused.graph.lint()
    fused.recompile()
    fused.training = gm.training
    return fused
