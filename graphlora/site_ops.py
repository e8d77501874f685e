"""How ops read parameters: the spellings of every kind of site, recognised from graph nodes.

:mod:`graphlora.sites` turns what this module recognises into :class:`~graphlora.sites.SiteSpec` s;
nothing else reads op targets. A linear layer reaches a graph as ``aten.linear``, ``addmm`` /
``mm`` against an ``(in, out)`` weight (transformers ``Conv1D``), or ``matmul`` against a parameter
or its transpose, and in ``symbolic_trace`` graphs as the torch-level functions. The other kinds:
an embedding lookup (``aten.embedding`` of a parameter), a convolution (``aten.conv1d/2d/3d``, a
non-transposed ``aten.convolution``: its geometry in :class:`ConvGeometry`), a batched expert GEMM
against a stacked ``(E, ., .)`` parameter (a grouped GEMM over tokens sorted by expert, or ``bmm``
of ``param[expert_ids]``), and an ``einsum`` of an activation with a parameter
(:class:`EinsumGeometry`).
"""

from __future__ import annotations

import operator
import string
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphlora.graph_utils import get_tensor

aten = torch.ops.aten
Layout = Literal["out_in", "in_out"]

#: the spellings (``SiteSpec.kind``) that are a linear layer
LINEAR_KINDS = frozenset({"linear", "addmm", "mm", "matmul"})


@dataclass(frozen=True)
class ConvGeometry:
    """How a convolution site slides its kernel; its LoRA ``A`` slides the same way."""

    dims: int  # 1, 2 or 3
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str  # per-dim zeros, or "same" / "valid"
    dilation: tuple[int, ...]
    groups: int


@dataclass(frozen=True)
class EinsumGeometry:
    """An ``einsum`` of one activation and one parameter, its labels sorted by role: the
    parameter's contracted labels (``in``: also in the activation, not in the output) and its free
    ones (``out``: in the output only), each in the parameter's own order."""

    x: str  # the activation's subscripts ("..." allowed)
    weight: str  # the parameter's subscripts
    out: str  # the output's subscripts
    in_labels: str
    out_labels: str
    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]

    def spare_label(self) -> str:
        """A label no subscript uses, for the rank."""
        used = set(self.x + self.weight + self.out)
        return next(c for c in "r" + string.ascii_letters if c not in used)  # einsum has 52 labels


_LINEAR = {aten.linear.default, F.linear, torch._C._nn.linear}
_ADDMM = {aten.addmm.default, torch.addmm}
_MM = {aten.mm.default, torch.mm}
_MATMUL = {aten.matmul.default, torch.matmul, operator.matmul}


_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.mT.default, torch.t}


def _call_kind(node: fx.Node) -> str | None:
    if node.op == "call_function":
        if node.target in _LINEAR:
            return "linear"
        if node.target in _ADDMM:
            return "addmm"
        if node.target in _MM:
            return "mm"
        if node.target in _MATMUL:
            return "matmul"
    if node.op == "call_method" and node.target in ("matmul", "mm", "__matmul__"):
        return "matmul" if node.target != "mm" else "mm"
    return None


def _is_2d_transpose(node: fx.Node) -> bool:
    """True when ``node`` swaps the two dims of a 2-D tensor, in any spelling."""
    if node.op == "call_function":
        t = node.target
        if t in _TRANSPOSES:
            return True
        if t in (aten.transpose.int, torch.transpose):
            dims = {d % 2 for d in node.args[1:3] if isinstance(d, int)}
            return dims == {0, 1}
        if t in (aten.permute.default, torch.permute):
            return list(node.args[1]) in ([1, 0], [-1, -2])
        if t is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT"):
            return True
    if node.op == "call_method":
        if node.target == "t":
            return True
        if node.target == "transpose" and len(node.args) == 3:
            return {d % 2 for d in node.args[1:3] if isinstance(d, int)} == {0, 1}
        if node.target == "permute":
            dims = node.args[1:] if len(node.args) > 2 else node.args[1]
            return list(dims) in ([1, 0], [-1, -2])
    return False


def strippable_transpose(node: fx.Node) -> bool:
    """True when ``node`` is a 2-D transpose whose input is a graph value (to read instead)."""
    return _is_2d_transpose(node) and isinstance(node.args[0], fx.Node)


def is_vector(gm: fx.GraphModule, node, length: int) -> bool:
    """True when ``node`` holds a 1-D tensor of ``length`` values, as a linear bias must."""
    if not isinstance(node, fx.Node):
        return False
    value = node.meta.get("val")
    if value is None and node.op == "get_attr":
        value = get_tensor(gm, node.target)
    return isinstance(value, torch.Tensor) and tuple(value.shape) == (length,)


def resolve_parameter(gm: fx.GraphModule, node: fx.Node, any_rank: bool = False
                       ) -> tuple[str, nn.Parameter] | None:
    if node.op != "get_attr":
        return None
    try:
        value = gm.get_parameter(node.target)
    except AttributeError:
        return None
    if value.dim() != 2 and not (any_rank and value.dim() >= 2):
        return None
    return node.target, value


def _weight_operand(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Parameter, bool] | None:
    """(param name, param, transposed) if ``node`` is a 2-D parameter or its transpose."""
    found = resolve_parameter(gm, node)
    if found:
        return found[0], found[1], False
    if isinstance(node, fx.Node) and strippable_transpose(node):
        found = resolve_parameter(gm, node.args[0])
        if found:
            return found[0], found[1], True
    return None


def is_activation(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and _weight_operand(gm, node) is None


def _scalar_one(value) -> bool:
    return value is None or value == 1


@dataclass(frozen=True)
class Operands:
    """Where one recognised op keeps its activation, weight and bias, and which parameter it reads."""

    kind: str
    input_index: int
    weight_index: int
    bias_index: int | None
    use_layout: Layout
    weight_name: str
    param: nn.Parameter
    weight_transposed: bool


def describe_linear(gm: fx.GraphModule, node: fx.Node) -> Operands | None:
    """The operands of ``node`` if it is a linear layer in one of the recognised spellings."""
    kind = _call_kind(node)
    if kind is None:
        return None
    args = node.args
    if kind == "linear":
        if len(args) < 2 or not is_activation(gm, args[0]):
            return None
        w = _weight_operand(gm, args[1])
        bias_index = 2 if len(args) > 2 and args[2] is not None else None
        if bias_index is None and node.kwargs.get("bias") is not None:
            return None  # bias passed as kwarg: rare, not normalised
        if w is None:
            return None
        name, param, transposed = w
        return Operands(kind, 0, 1, bias_index, "in_out" if transposed else "out_in", name, param, transposed)
    if kind == "addmm":
        if len(args) != 3 or not _scalar_one(node.kwargs.get("beta")) or not _scalar_one(node.kwargs.get("alpha")):
            return None
        if not is_activation(gm, args[1]):
            return None
        w = _weight_operand(gm, args[2])
        if w is None:
            return None
        name, param, transposed = w
        return Operands(kind, 1, 2, 0, "out_in" if transposed else "in_out", name, param, transposed)
    # mm / matmul: activation @ weight
    if len(args) != 2 or not is_activation(gm, args[0]):
        return None
    w = _weight_operand(gm, args[1])
    if w is None:
        return None
    name, param, transposed = w
    return Operands(kind, 0, 1, None, "out_in" if transposed else "in_out", name, param, transposed)


_CONV = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
         aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}


def _int_tuple(value, dims: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * dims
    if isinstance(value, int):
        return (value,) * dims
    out = tuple(int(v) for v in value)
    return out * dims if len(out) == 1 else out


def describe_other(gm: fx.GraphModule, node: fx.Node) -> tuple[Operands, dict] | None:
    """The operands of an embedding lookup or a convolution against a parameter, with the spec
    fields only those kinds have; None for anything else (a transposed convolution, a lookup
    into an activation, a kwarg-spelled call)."""
    if node.op != "call_function" or node.kwargs:
        return None
    args = node.args
    if node.target == aten.embedding.default:
        found = resolve_parameter(gm, args[0]) if isinstance(args[0], fx.Node) else None
        if found is None or len(args) > 4 and args[4] or len(args) > 3 and args[3]:
            return None  # sparse gradients and scale_grad_by_freq: not what the branch computes
        padding_idx = args[2] if len(args) > 2 and args[2] is not None and args[2] >= 0 else None
        name, param = found
        return Operands("embedding", 1, 0, None, "in_out", name, param, False), {"padding_idx": padding_idx}
    if node.target in _CONV:
        dims, stride, padding, dilation, groups = _CONV[node.target], *(list(args[3:7]) + [None] * 4)[:4]
    elif node.target == aten.convolution.default and len(args) == 9 and not args[6]:
        dims = len(args[3])
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    else:
        return None
    if not isinstance(args[1], fx.Node) or args[1].op != "get_attr" or not is_activation(gm, args[0]):
        return None
    try:
        param = gm.get_parameter(args[1].target)
    except AttributeError:
        return None
    if param.dim() != dims + 2:
        return None
    if not isinstance(padding, str):
        padding = _int_tuple(padding, dims, 0)
    geometry = ConvGeometry(dims, tuple(param.shape[2:]), _int_tuple(stride, dims, 1), padding,
                            _int_tuple(dilation, dims, 1), int(groups or 1))
    bias_index = 2 if len(args) > 2 and args[2] is not None else None
    return Operands("conv", 0, 1, bias_index, "out_in", args[1].target, param, False), {"conv": geometry}


def _op_name(target) -> str:
    name = getattr(target, "name", None)
    return name() if callable(name) else ""


#: grouped GEMMs over tokens sorted by expert: ``(x (S, in), W (E, in, out), offsets)``
_GROUPED_MM = {"aten::_grouped_mm", "transformers::grouped_mm_fallback"}


def is_grouped_mm(node: fx.Node) -> bool:
    """A grouped expert GEMM ``(x (S, in), W (E, in, out), offsets)``, in any spelling."""
    return node.op == "call_function" and _op_name(node.target) in _GROUPED_MM and len(node.args) == 3


def _stacked_parameter(gm: fx.GraphModule, node) -> tuple[str, nn.Parameter, bool] | None:
    """(name, param, transposed) if ``node`` reads a 3-D parameter or swaps its last two dims."""
    transposed = False
    if (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.transpose.int
            and {d % 3 for d in node.args[1:3]} == {1, 2}):
        node, transposed = node.args[0], True
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        param = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return (node.target, param, transposed) if param.dim() == 3 else None


def describe_experts(gm: fx.GraphModule, node: fx.Node) -> tuple[Operands, dict] | None:
    """The operands of a batched expert GEMM against a stacked ``(E, ., .)`` parameter: a grouped
    GEMM (transformers' ``grouped_mm`` experts) or ``bmm`` of ``param[expert_ids]`` (its
    ``batched_mm`` experts), in either orientation; None for anything else."""
    if node.op != "call_function" or node.kwargs:
        return None
    args = node.args
    if is_grouped_mm(node):
        found = _stacked_parameter(gm, args[1])
        if found is None or not is_activation(gm, args[0]):
            return None
        name, param, transposed = found  # the op reads (E, in, out)
        layout = "out_in" if transposed else "in_out"
        return (Operands("experts", 0, 1, None, layout, name, param, transposed),
                {"num_experts": int(param.shape[0]), "expert_op": "grouped_mm"})
    if node.target != aten.bmm.default or len(args) != 2:
        return None
    for weight_index in (0, 1):
        index = args[weight_index]
        if not (isinstance(index, fx.Node) and index.op == "call_function" and index.target == aten.index.Tensor
                and len(index.args[1]) == 1 and isinstance(index.args[1][0], fx.Node)):
            continue
        found = _stacked_parameter(gm, index.args[0])
        if found is None or found[2] or not is_activation(gm, args[1 - weight_index]):
            continue
        name, param, _ = found  # W[ids] @ x reads (E, out, in); x @ W[ids] reads (E, in, out)
        layout = "out_in" if weight_index == 0 else "in_out"
        return (Operands("experts", 1 - weight_index, weight_index, None, layout, name, param, False),
                {"num_experts": int(param.shape[0]), "expert_op": "bmm"})
    return None


def describe_einsum(gm: fx.GraphModule, node: fx.Node) -> tuple[Operands, dict] | None:
    """The operands of ``einsum(eq, [x, W])`` (either order) with ``W`` a parameter whose every
    label is contracted with ``x`` or kept in the output, at least one of each (a label shared by
    all three would be a batch of weights: not a site); None for anything else."""
    if node.op != "call_function" or node.target != aten.einsum.default or node.kwargs or len(node.args) != 2:
        return None
    equation, operands = node.args
    if not isinstance(equation, str) or "->" not in equation or len(operands) != 2:
        return None
    lhs, out = equation.replace(" ", "").split("->")
    subs = lhs.split(",")
    for weight_index in (0, 1):
        read, x = operands[weight_index], operands[1 - weight_index]
        found = resolve_parameter(gm, read, any_rank=True) if isinstance(read, fx.Node) else None
        if found is None or not is_activation(gm, x) or len(subs) != 2:
            continue
        name, param = found
        w_sub, x_sub = subs[weight_index], subs[1 - weight_index]
        if "." in w_sub or len(set(w_sub)) != len(w_sub) or len(w_sub) != param.dim():
            continue
        in_labels = "".join(c for c in w_sub if c in x_sub and c not in out)
        out_labels = "".join(c for c in w_sub if c in out and c not in x_sub)
        if not in_labels or not out_labels or len(in_labels) + len(out_labels) != len(w_sub):
            continue
        dims = dict(zip(w_sub, param.shape))
        geometry = EinsumGeometry(x_sub, w_sub, out, in_labels, out_labels,
                                  tuple(int(dims[c]) for c in in_labels), tuple(int(dims[c]) for c in out_labels))
        return (Operands("einsum", 1 - weight_index, weight_index, None, "out_in", name, param, False),
                {"einsum": geometry})
    return None
