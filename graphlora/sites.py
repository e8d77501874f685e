"""Sites: one normalised view of "a layer in the graph", whatever op spells it.

:mod:`graphlora.site_ops` recognises every spelling of every kind of site (a linear layer in any
of its spellings, an embedding lookup, a convolution, a batched expert GEMM, an einsum against a
parameter); this module writes what it found into the node's metadata once, as a
:class:`SiteSpec`, and every later pass reads the spec and never looks at op targets again.
:attr:`SiteSpec.site_kind` says which kind a site is; rules name the kinds they apply to. For
execution fusion it also rewrites any linear site into the one canonical spelling
(:meth:`LinearSite.as_linear`), so the fusions match a single op and still cover every site.

Weight layout is tracked at two levels. ``param_layout`` is the orientation of the parameter as
stored (``out_in`` like ``nn.Linear``, ``in_out`` like ``Conv1D``; decided by its first use and
what PEFT calls ``fan_in_fan_out``); ``use_layout`` is how one particular use reads it. They differ
only for a parameter used in both orientations, which the LoRA pass handles by transposing the
delta at that use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphlora import meta
from graphlora.graph_utils import evaluate
from graphlora.site_ops import (
    LINEAR_KINDS,
    ConvGeometry,
    EinsumGeometry,
    Layout,
    describe_einsum,
    describe_experts,
    describe_linear,
    describe_other,
    is_grouped_mm,
    is_vector,
    strippable_transpose,
)

aten = torch.ops.aten

__all__ = ["LINEAR_KINDS", "ConvGeometry", "EinsumGeometry", "Layout", "LinearSite", "SiteSpec", "find_linear_sites",
           "find_sites", "functionalize_linear_modules", "is_grouped_mm", "iter_site_groups", "tagged_sites"]


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
    #: experts sites: how many experts the stacked ``(E, ., .)`` parameter holds; ``expert_op``
    #: "grouped_mm" (tokens sorted by expert, ``args[2]`` the offsets) or "bmm" (the op reads
    #: ``param[expert_ids]``: ``args[weight_index]`` is that ``index`` node)
    num_experts: int = 1
    expert_op: str | None = None
    einsum: EinsumGeometry | None = None  # einsum sites

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The parameter's shape as stored (whatever its layout, kernel or experts)."""
        in_f, out_f = ((self.in_features, self.out_features) if self.use_layout == self.param_layout
                       else (self.out_features, self.in_features))
        if self.conv is not None:
            return (out_f, in_f // self.conv.groups, *self.conv.kernel_size)
        if self.einsum is not None:
            e = self.einsum
            dims = dict(zip(e.in_labels + e.out_labels, e.in_dims + e.out_dims))
            return tuple(dims[label] for label in e.weight)
        shape = (out_f, in_f) if self.param_layout == "out_in" else (in_f, out_f)
        return (self.num_experts, *shape) if self.site_kind == "experts" else shape

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
        if self.spec.einsum is not None:  # einsum(equation, [operands])
            return self.node.args[1][self.spec.input_index]
        return self.node.args[self.spec.input_index]

    @property
    def weight_input(self) -> fx.Node:
        """The node fed to the op as weight (the parameter read, its transpose, or a dequant);
        for a ``bmm`` experts site, the stacked weight the op's ``index`` reads rows of."""
        if self.spec.einsum is not None:
            return self.node.args[1][self.spec.weight_index]
        read = self.node.args[self.spec.weight_index]
        return read.args[0] if self.spec.expert_op == "bmm" else read

    @property
    def output(self) -> fx.Node:
        return self.node

    def replace_weight_input(self, new: fx.Node) -> None:
        """Feed ``new`` exactly as the op reads its weight, leaving other uses alone."""
        if self.spec.einsum is not None:
            operands = list(self.node.args[1])
            operands[self.spec.weight_index] = new
            self.node.args = (self.node.args[0], operands)
            return
        if self.spec.expert_op == "bmm":  # the experts' rows are picked from ``new``
            index = self.node.args[self.spec.weight_index]
            self.node.prepend(index)  # after ``new``, which weight passes insert before the op
            index.args = (new, *index.args[1:])
            return
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
        if bias is not None and not is_vector(node.graph.owning_module, bias, s.out_features):
            return False
        read, weight, transposed = self.weight_input, self.weight_input, s.weight_transposed
        if s.kind != "linear":  # the op reads (in, out); linear reads (out, in)
            weight = read.args[0] if strippable_transpose(read) else self._transpose(read)
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
        stacked = self.spec.site_kind == "experts"  # (E, ., .): the last two dims swap
        with graph.inserting_before(self.node):
            t = graph.call_function(aten.transpose.int, (value, -2, -1)) if stacked else (
                graph.call_function(aten.t.default, (value,)))
        meta.tag(t, "weight", module_path=self.module_path, tensor=self.spec.weight_name)
        if "val" in value.meta:
            t.meta["val"] = value.meta["val"].transpose(-2, -1)
        return t

    def param_value(self) -> torch.Tensor:
        """The weight this site currently computes with, in the parameter's stored layout.

        Evaluates whatever feeds the op's weight (a parameter read, a dequantize, ...), so it
        also works after quantization passes replaced the weight.
        """
        value = evaluate(self.node.graph.owning_module, self.weight_input)
        return value.transpose(-2, -1) if self.spec.weight_transposed else value

    @property
    def rule(self):
        return meta.info(self.node).get("rule")


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


def find_sites(gm: fx.GraphModule, kinds: tuple[str, ...] = ("linear", "embedding", "conv", "experts", "einsum")
               ) -> list[LinearSite]:
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
        ops, extra = describe_linear(gm, node) if "linear" in kinds else None, {}
        if ops is None and ("embedding" in kinds or "conv" in kinds):
            ops, extra = describe_other(gm, node) or (None, {})
            if ops is not None and ops.kind not in kinds:
                ops = None
        if ops is None and "experts" in kinds:
            ops, extra = describe_experts(gm, node) or (None, {})
        if ops is None and "einsum" in kinds:
            ops, extra = describe_einsum(gm, node) or (None, {})
        if ops is None:
            continue
        # an embedding's rows are its inputs, so a tied lm_head (which reads them as outputs) keeps
        # its own layout: the two are separate PEFT modules with their own factor shapes
        param_layout = param_layouts.setdefault((id(ops.param), ops.kind == "embedding"), ops.use_layout)
        if ops.kind == "einsum":
            rows, cols = math.prod(extra["einsum"].out_dims), math.prod(extra["einsum"].in_dims)
        else:
            rows, cols = ops.param.shape[1:3] if ops.kind == "experts" else ops.param.shape[:2]
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
