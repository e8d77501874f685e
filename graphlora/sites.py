"""Linear sites: one normalised view of "a linear layer in the graph".

A linear layer reaches a traced graph in many spellings: ``aten.linear`` (``nn.Linear``,
``F.linear``), ``addmm``/``mm`` against an ``(in, out)`` weight (transformers ``Conv1D``),
``matmul`` of an activation against a parameter or its transpose (``x @ self.weight.T``), and in
``symbolic_trace`` graphs ``call_module`` Linear and the torch-level functions. This module is the
only place that knows those spellings. It recognises them once and writes a :class:`SiteSpec`
into the node's metadata; every later pass reads the spec and never looks at op targets again.
For execution fusion it also rewrites any site into the one canonical spelling
(:meth:`LinearSite.as_linear`), so the fusions match a single op and still cover every site.

Two other kinds of site read a parameter the same way a linear layer does, and LoRA adapts them
as PEFT does: an embedding lookup (``aten.embedding``: a linear layer on one-hot inputs whose
weight is stored ``(in, out)`` = ``(num_embeddings, dim)``) and a convolution
(``aten.conv1d/2d/3d``, ``aten.convolution`` when not transposed: weight
``(out, in / groups, *kernel)``, its geometry in :class:`ConvGeometry`).
:attr:`SiteSpec.site_kind` says which of the three a site is; rules name the kinds they apply to.

Weight layout is tracked at two levels. ``param_layout`` is the orientation of the parameter as
stored (``out_in`` like ``nn.Linear``, ``in_out`` like ``Conv1D``; decided by its first use and
what PEFT calls ``fan_in_fan_out``); ``use_layout`` is how one particular use reads it. They differ
only for a parameter used in both orientations, which the LoRA pass handles by transposing the
delta at that use.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Iterator, Literal

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphlora import meta
from graphlora.graph_utils import evaluate, get_tensor

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
class SiteSpec:
    """Where the pieces of one linear site are, independent of how the op was spelled."""

    kind: str  # linear | addmm | mm | matmul
    module_path: str
    weight_name: str  # qualified name of the parameter read by this site
    input_index: int  # position of the activation in node.args
    weight_index: int  # position of the weight (or its transpose) in node.args
    bias_index: int | None
    use_layout: Layout
    param_layout: Layout
    weight_transposed: bool  # the op reads a transpose of the parameter
    in_features: int
    out_features: int
    use_index: int  # 0 for the first use of this module path, 1 for the second, ...
    weight_dtype: str
    weight_device: str
    conv: ConvGeometry | None = None  # conv sites
    padding_idx: int | None = None  # embedding sites: the row whose gradient the lookup zeroes

    @property
    def site_kind(self) -> str:
        """``"linear"`` (every spelling of one), ``"embedding"`` or ``"conv"``."""
        return "linear" if self.kind in LINEAR_KINDS else self.kind

    @property
    def key(self) -> str:
        """Unique per use: ``module_path`` alone for the first use, ``module_path#n`` after."""
        return self.module_path if self.use_index == 0 else f"{self.module_path}#{self.use_index}"


@dataclass
class LinearSite:
    """A recognised linear node plus its spec; the runtime view passes work with."""

    node: fx.Node
    spec: SiteSpec

    @property
    def module_path(self) -> str:
        return self.spec.module_path

    @property
    def input(self) -> fx.Node:
        return self.node.args[self.spec.input_index]

    @property
    def weight_input(self) -> fx.Node:
        """The node fed to the op as weight (the parameter read, its transpose, or a dequant)."""
        return self.node.args[self.spec.weight_index]

    @property
    def output(self) -> fx.Node:
        return self.node

    def replace_weight_input(self, new: fx.Node) -> None:
        """Feed ``new`` exactly as the op reads its weight, leaving other uses alone."""
        args = list(self.node.args)
        args[self.spec.weight_index] = new
        self.node.args = tuple(args)

    @property
    def bias(self) -> fx.Node | None:
        """The node fed to the op as bias (None for a site without one)."""
        i = self.spec.bias_index
        return None if i is None else self.node.args[i]

    def feed_param(self, new: fx.Node) -> fx.Node:
        """Feed ``new``, a value in the *parameter's stored layout*, as this site's weight.

        Inserts the transpose this use applied to the original parameter, so weight passes never
        need to know whether the op was ``linear``, ``addmm`` or ``x @ W.T``. Returns the node
        now at the op's weight position.
        """
        fed = self._transpose(new) if self.spec.weight_transposed else new
        self.replace_weight_input(fed)
        return fed

    def as_linear(self) -> bool:
        """Rewrite this site into ``aten.linear(x, W_(out, in), bias)``; True when it changed.

        Execution fusion (the LoRA branch into the base GEMM, sibling GEMMs into one) rewrites
        that one spelling, so every site gets it: ``addmm(b, x, W)``, ``mm(x, W)`` and
        ``x @ W`` read an ``(in, out)`` weight, and the canonical form strips the transpose the
        op read (``x @ P.T`` becomes ``linear(x, P)``) or inserts one (``Conv1D``'s
        ``addmm(b, x, P)`` becomes ``linear(x, P.t(), b)``, a view: no copy). Same function,
        same GEMM. The node's metadata moves to the new node (a tagged site's with an updated
        spec).

        Returns False and leaves the graph alone when the site already is in that form, or
        cannot be: an ``addmm`` whose bias is not one value per output. Meant for execution
        copies (:func:`graphlora.passes.fuse_siblings.fused_copy`): the canonical graph keeps the
        model's own spellings, which saving, export and the graph diff show.
        """
        s, node = self.spec, self.node
        if s.site_kind != "linear":
            return False
        if node.op == "call_function" and node.target == aten.linear.default and not node.kwargs:
            return False
        bias = self.bias
        if bias is not None and not _is_vector(node.graph.owning_module, bias, s.out_features):
            return False
        read, weight, transposed = self.weight_input, self.weight_input, s.weight_transposed
        if s.kind != "linear":  # the op reads (in, out); linear reads (out, in)
            weight = read.args[0] if _strippable_transpose(read) else self._transpose(read)
            transposed = not transposed
        graph = node.graph
        args = (self.input, weight) if bias is None else (self.input, weight, bias)
        with graph.inserting_before(node):
            canonical = graph.call_function(aten.linear.default, args)
        canonical.meta = dict(node.meta)
        node.replace_all_uses_with(canonical)
        graph.erase_node(node)
        if read is not weight and not read.users:
            graph.erase_node(read)  # the stripped transpose
        self.node = canonical
        self.spec = replace(s, kind="linear", input_index=0, weight_index=1,
                            bias_index=None if bias is None else 2, weight_transposed=transposed)
        if meta.role(canonical) == "base":
            meta.tag(canonical, "base", site=self.spec)
        return True

    def _transpose(self, value: fx.Node) -> fx.Node:
        """A weight-role ``aten.t`` of ``value``, inserted before this site."""
        graph = self.node.graph
        with graph.inserting_before(self.node):
            t = graph.call_function(aten.t.default, (value,))
        meta.tag(t, "weight", module_path=self.module_path, tensor=self.spec.weight_name)
        if "val" in value.meta:
            t.meta["val"] = value.meta["val"].t()
        return t

    def param_value(self) -> torch.Tensor:
        """The weight this site currently computes with, in the parameter's stored layout.

        Evaluates whatever feeds the op's weight (a parameter read, a dequantize, ...), so it
        also works after quantization passes replaced the weight.
        """
        value = evaluate(self.node.graph.owning_module, self.weight_input)
        return value.t() if self.spec.weight_transposed else value

    @property
    def rule(self):
        return meta.info(self.node).get("rule")


# --------------------------------------------------------------------------- recognition

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


def _strippable_transpose(node: fx.Node) -> bool:
    """True when ``node`` is a 2-D transpose whose input is a graph value (to read instead)."""
    return _is_2d_transpose(node) and isinstance(node.args[0], fx.Node)


def _is_vector(gm: fx.GraphModule, node, length: int) -> bool:
    """True when ``node`` holds a 1-D tensor of ``length`` values, as a linear bias must."""
    if not isinstance(node, fx.Node):
        return False
    value = node.meta.get("val")
    if value is None and node.op == "get_attr":
        value = get_tensor(gm, node.target)
    return isinstance(value, torch.Tensor) and tuple(value.shape) == (length,)


def _resolve_parameter(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Parameter] | None:
    if node.op != "get_attr":
        return None
    try:
        value = gm.get_parameter(node.target)
    except AttributeError:
        return None
    if value.dim() != 2:
        return None
    return node.target, value


def _weight_operand(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Parameter, bool] | None:
    """(param name, param, transposed) if ``node`` is a 2-D parameter or its transpose."""
    found = _resolve_parameter(gm, node)
    if found:
        return found[0], found[1], False
    if isinstance(node, fx.Node) and _strippable_transpose(node):
        found = _resolve_parameter(gm, node.args[0])
        if found:
            return found[0], found[1], True
    return None


def _is_activation(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and _weight_operand(gm, node) is None


def _scalar_one(value) -> bool:
    return value is None or value == 1


@dataclass(frozen=True)
class _Operands:
    """Where one recognised op keeps its activation, weight and bias, and which parameter it reads."""

    kind: str
    input_index: int
    weight_index: int
    bias_index: int | None
    use_layout: Layout
    weight_name: str
    param: nn.Parameter
    weight_transposed: bool


def _describe(gm: fx.GraphModule, node: fx.Node) -> _Operands | None:
    """The operands of ``node`` if it is a linear layer in one of the recognised spellings."""
    kind = _call_kind(node)
    if kind is None:
        return None
    args = node.args
    if kind == "linear":
        if len(args) < 2 or not _is_activation(gm, args[0]):
            return None
        w = _weight_operand(gm, args[1])
        bias_index = 2 if len(args) > 2 and args[2] is not None else None
        if bias_index is None and node.kwargs.get("bias") is not None:
            return None  # bias passed as kwarg: rare, not normalised
        if w is None:
            return None
        name, param, transposed = w
        return _Operands(kind, 0, 1, bias_index, "in_out" if transposed else "out_in", name, param, transposed)
    if kind == "addmm":
        if len(args) != 3 or not _scalar_one(node.kwargs.get("beta")) or not _scalar_one(node.kwargs.get("alpha")):
            return None
        if not _is_activation(gm, args[1]):
            return None
        w = _weight_operand(gm, args[2])
        if w is None:
            return None
        name, param, transposed = w
        return _Operands(kind, 1, 2, 0, "out_in" if transposed else "in_out", name, param, transposed)
    # mm / matmul: activation @ weight
    if len(args) != 2 or not _is_activation(gm, args[0]):
        return None
    w = _weight_operand(gm, args[1])
    if w is None:
        return None
    name, param, transposed = w
    return _Operands(kind, 0, 1, None, "out_in" if transposed else "in_out", name, param, transposed)


_CONV = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
         aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}


def _int_tuple(value, dims: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * dims
    if isinstance(value, int):
        return (value,) * dims
    out = tuple(int(v) for v in value)
    return out * dims if len(out) == 1 else out


def _describe_other(gm: fx.GraphModule, node: fx.Node) -> tuple[_Operands, dict] | None:
    """The operands of an embedding lookup or a convolution against a parameter, with the spec
    fields only those kinds have; None for anything else (a transposed convolution, a lookup
    into an activation, a kwarg-spelled call)."""
    if node.op != "call_function" or node.kwargs:
        return None
    args = node.args
    if node.target == aten.embedding.default:
        found = _resolve_parameter(gm, args[0]) if isinstance(args[0], fx.Node) else None
        if found is None or len(args) > 4 and args[4] or len(args) > 3 and args[3]:
            return None  # sparse gradients and scale_grad_by_freq: not what the branch computes
        padding_idx = args[2] if len(args) > 2 and args[2] is not None and args[2] >= 0 else None
        name, param = found
        return _Operands("embedding", 1, 0, None, "in_out", name, param, False), {"padding_idx": padding_idx}
    if node.target in _CONV:
        dims, stride, padding, dilation, groups = _CONV[node.target], *(list(args[3:7]) + [None] * 4)[:4]
    elif node.target == aten.convolution.default and len(args) == 9 and not args[6]:
        dims = len(args[3])
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    else:
        return None
    if not isinstance(args[1], fx.Node) or args[1].op != "get_attr" or not _is_activation(gm, args[0]):
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
    return _Operands("conv", 0, 1, bias_index, "out_in", args[1].target, param, False), {"conv": geometry}


def _owner_path(gm: fx.GraphModule, weight_name: str, node: fx.Node, aliases: dict[int, list[str]]) -> str:
    """The module path a site is known by: the module owning its weight.

    ``F.linear(x, self.inp.weight)`` in a parent's forward is site ``inp``; a bare parameter
    ``self.raw`` is site ``raw``. For tied weights (one tensor, several names) the name whose
    owner is the module the op runs in wins, so ``lm_head`` stays ``lm_head``.
    """

    def path_of(name: str) -> str:
        head, _, leaf = name.rpartition(".")
        return head if leaf == "weight" else name

    param = gm.get_parameter(weight_name)
    candidates = [path_of(n) for n in aliases.get(id(param), [weight_name])]
    stack = node.meta.get("nn_module_stack")
    if stack:
        innermost = _normalise_stack_path(list(stack.values())[-1][0])
        if innermost in candidates:
            return innermost
    return path_of(weight_name)


def _normalise_stack_path(path: str) -> str:
    # torch.export writes plain module paths; older tracers wrote "L__self___a_b" style names
    if path.startswith("L__self__"):
        path = path[len("L__self__"):].lstrip("_").replace("_", ".")
    return path


def find_linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Recognise every linear site of ``gm`` (graph order). Nothing is written to the graph."""
    return find_sites(gm, ("linear",))


def find_sites(gm: fx.GraphModule, kinds: tuple[str, ...] = ("linear", "embedding", "conv")) -> list[LinearSite]:
    """Recognise every site of ``gm`` of the given :attr:`SiteSpec.site_kind` s (graph order)."""
    aliases: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    param_layouts: dict[tuple[int, bool], Layout] = {}
    uses: dict[str, int] = {}
    sites: list[LinearSite] = []
    for node in gm.graph.nodes:
        if meta.role(node) is not None and meta.role(node) != "base":
            continue  # nodes graphlora inserted are never sites themselves
        ops, extra = _describe(gm, node) if "linear" in kinds else None, {}
        if ops is None and ("embedding" in kinds or "conv" in kinds):
            ops, extra = _describe_other(gm, node) or (None, {})
            if ops is not None and ops.kind not in kinds:
                ops = None
        if ops is None:
            continue
        # an embedding's rows are its inputs, so a tied lm_head (which reads them as outputs) keeps
        # its own layout: the two are separate PEFT modules with their own factor shapes
        param_layout = param_layouts.setdefault((id(ops.param), ops.kind == "embedding"), ops.use_layout)
        rows, cols = ops.param.shape[:2]
        if ops.kind == "conv":
            cols *= extra["conv"].groups  # the weight holds in / groups input channels
        out_f, in_f = (rows, cols) if ops.use_layout == "out_in" else (cols, rows)
        path = _owner_path(gm, ops.weight_name, node, aliases)
        use_index = uses.get(path, 0)
        uses[path] = use_index + 1
        spec = SiteSpec(
            kind=ops.kind,
            module_path=path,
            weight_name=ops.weight_name,
            input_index=ops.input_index,
            weight_index=ops.weight_index,
            bias_index=ops.bias_index,
            use_layout=ops.use_layout,
            param_layout=param_layout,
            weight_transposed=ops.weight_transposed,
            in_features=in_f,
            out_features=out_f,
            use_index=use_index,
            weight_dtype=str(ops.param.dtype).replace("torch.", ""),
            weight_device=str(ops.param.device),
            **extra,
        )
        sites.append(LinearSite(node, spec))
    return sites


def tagged_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """The sites a previous pass tagged (``role == "base"``), whatever their weight now is."""
    return [
        LinearSite(n, meta.info(n)["site"])
        for n in gm.graph.nodes
        if meta.role(n) == "base" and "site" in meta.info(n)
    ]


def iter_site_groups(sites: list[LinearSite]) -> Iterator[tuple[str, list[LinearSite]]]:
    """Sites grouped by module path (a weight used at several places is one group)."""
    groups: dict[str, list[LinearSite]] = {}
    for s in sites:
        groups.setdefault(s.module_path, []).append(s)
    yield from groups.items()


# --------------------------------------------------------------------------- normalisation


def functionalize_linear_modules(gm: fx.GraphModule) -> bool:
    """Rewrite ``call_module`` nodes on ``nn.Linear`` into ``F.linear`` on ``get_attr`` reads.

    ``symbolic_trace`` keeps ``nn.Linear`` as opaque module calls; after this every linear layer
    is a function call whose weight is a graph value, which is what the weight passes rewrite.
    """
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if type(module) is not nn.Linear:
            continue
        with gm.graph.inserting_before(node):
            w = gm.graph.get_attr(f"{node.target}.weight")
            b = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
            new = gm.graph.call_function(F.linear, (node.args[0], w, b))
        stack = dict(node.meta.get("nn_module_stack", {}))
        stack.setdefault(node.target, (node.target, type(module)))
        for n in (w, b, new):
            if n is not None:
                n.meta["nn_module_stack"] = stack
        new.meta.update({k: v for k, v in node.meta.items() if k != "nn_module_stack"})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
