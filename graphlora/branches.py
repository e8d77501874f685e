"""LoRA branches: one view of "the LoRA branch of one site use", read by every pass.

:class:`~graphlora.passes.insert_lora.InsertLoraPass` writes a branch as ::

    add(base, b(scale(a(dropout(x)))))   standard:   linear(x, A), * s, linear(h, B)
    add(base, a(scale(b(dropout(x)))))   transposed: x @ B, * s, @ A  (a use reading the
                                                     parameter in its other orientation)

with, when the factors' dtype differs from the site's (float32 factors on a bfloat16 base, PEFT's
``autocast_adapter_dtype``), ``x`` cast to the factors' dtype first (``lora_cast_in``) and the
promoted sum cast back to the base output's dtype (``lora_cast_out``),

and tags each of those nodes with its role, ``adapter``, ``module_path`` and ``site_key`` (the
use's :attr:`~graphlora.sites.SiteSpec.key`). Quantization passes later put fake-quant nodes
(observers while calibrating) on the branch input, the A/B weights and the rank-r activation;
those carry the adapter and module path but no site key. This module recognises a branch once,
from its ``lora_add``, so fusion, observers, removal, merging and export all read the same
:class:`LoraBranch` — and the delta ``scale * B @ A`` is computed here only.

Nodes are matched by their site key rather than by module path: a module applied twice
(``lin(lin(x))``) has two branches of one adapter and path, and the second one's input is the
first one's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from graphlora import meta
from graphlora.dora import MAGNITUDE, dora_delta
from graphlora.errors import PassError
from graphlora.graph_utils import evaluate
from graphlora.sites import EinsumGeometry, LinearSite, SiteSpec, tagged_sites

aten = torch.ops.aten

LORA_ROLES = frozenset({"lora_a", "lora_b", "lora_dropout", "lora_scale", "lora_add", "lora_gate",
                        "lora_cast_in", "lora_cast_out", "lora_view", "dora_norm", "dora_scale", "dora_mix"})
QUANTIZER_ROLES = frozenset({"fake_quant", "observer"})


def expert_factors(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-expert pairs of a stacked experts site: ``A (r * E, in)`` -> ``(E, r, in)`` (expert
    ``e``'s rows are ``e * r .. e * r + r - 1``) and ``B (out, r * E)`` -> ``(E, out, r)`` (its
    columns are ``j * E + e``): PEFT's ``ParamWrapper`` layout, so its files carry over."""
    a3 = a.reshape(experts, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)
    return a3, b3


def einsum_factors(a: torch.Tensor, b: torch.Tensor, geometry: EinsumGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """An einsum site's pair, stored ``A (r, prod(in))`` / ``B (prod(out), r)``, viewed on the
    parameter's own labels: ``A (r, *in_dims)``, ``B (*out_dims, r)``."""
    return a.reshape(a.shape[0], *geometry.in_dims), b.reshape(*geometry.out_dims, b.shape[-1])


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, site: SiteSpec, shared: bool = False) -> torch.Tensor:
    """``scale * B @ A`` in float32, laid out as the parameter is stored.

    The pair has PEFT's shapes in the parameter's orientation (``A (r, in)``, ``B (out, r)``)
    whichever way a use reads it, so the product is ``(out, in)``, transposed for ``(in, out)``
    (Conv1D, embedding) parameters. A convolution's pair (``A (r, in, *k)``, 1x1 ``B``) is a
    kernel ``(out, in, *k)``: each tap of ``A`` times ``B``. With ``groups > 1`` the pair (a full
    ``A``, a grouped ``B``) mixes channels across groups, which the grouped weight cannot hold:
    PEFT cannot merge it either.
    """
    a, b = a.detach().float(), b.detach().float()
    conv, einsum, experts, param_layout = site.conv, site.einsum, site.num_experts, site.param_layout
    if conv is not None:
        if conv.groups > 1:
            raise PassError(
                f"a LoRA pair on a convolution with groups={conv.groups} cannot be merged into its "
                "weight: A reads every input channel, so the delta is not grouped (PEFT refuses this "
                "merge too); keep the branch (ONNX lora='branch')")
        return torch.einsum("or,ri...->oi...", b.flatten(1), a) * scale
    if einsum is not None:  # the product laid out on the parameter's labels
        av, bv = einsum_factors(a, b, einsum)
        rank = einsum.spare_label()
        return torch.einsum(f"{einsum.out_labels}{rank},{rank}{einsum.in_labels}->{einsum.weight}", bv, av) * scale
    if experts > 1 and shared:  # one pair for every expert
        delta = ((b @ a) * scale).expand(experts, -1, -1)
        return delta if param_layout == "out_in" else delta.transpose(1, 2)
    if experts > 1:
        a3, b3 = expert_factors(a, b, experts)
        delta = (b3 @ a3) * scale  # (E, out, in)
        return delta if param_layout == "out_in" else delta.transpose(1, 2)
    delta = (b @ a) * scale
    return delta if param_layout == "out_in" else delta.t()


@dataclass
class LoraBranch:
    """The nodes of one adapter's branch at one site use."""

    add: fx.Node
    site: LinearSite
    adapter: str
    a: fx.Node | None = None
    b: fx.Node | None = None
    scale: fx.Node | None = None
    dropout: fx.Node | None = None
    a_weight: fx.Node | None = None  # the read of the stored lora_A parameter
    b_weight: fx.Node | None = None
    cast_in: fx.Node | None = None  # the input cast to the factors' dtype (mixed precision)
    cast_out: fx.Node | None = None  # the sum cast back to the base output's dtype
    magnitude: fx.Node | None = None  # DoRA: the read of the stored magnitude vector
    dora_scale: fx.Node | None = None  # DoRA: magnitude / detached row norms of W + s B A
    quantizers: list[fx.Node] = field(default_factory=list)  # fake-quant / observers on it
    owned: list[fx.Node] = field(default_factory=list)  # everything removal takes out, graph order

    @property
    def module_path(self) -> str:
        return self.site.module_path

    @property
    def site_key(self) -> str:
        return self.site.spec.key

    @property
    def ops(self) -> list[fx.Node]:
        """The branch's own computations, input to output (the add and its cast not included)."""
        spec = self.site.spec
        a_first = spec.use_layout == spec.param_layout
        order = (self.cast_in, self.dropout, self.a, self.scale, self.b) if a_first else (
            self.cast_in, self.dropout, self.b, self.scale, self.a)
        return [n for n in order if n is not None]

    @property
    def output(self) -> fx.Node:
        """The node the site's readers read: the add, or its cast back to the base's dtype."""
        return self.cast_out if self.cast_out is not None else self.add

    @property
    def mixed_precision(self) -> bool:
        """Whether the factors' dtype differs from the site's (casts around the branch)."""
        return self.cast_in is not None or self.cast_out is not None

    @property
    def nodes(self) -> list[fx.Node]:
        """Its computations and the quantizers on it, in graph order."""
        computing = set(self.ops) | set(self.quantizers)
        return [n for n in self.owned if n in computing]

    @property
    def dora(self) -> bool:
        """A DoRA branch (:mod:`graphlora.dora`): the site's output is rescaled per row, so the
        branch is not ``base + delta(x)`` and passes that assume it (fusion, inputs export) skip it."""
        return self.magnitude is not None

    @property
    def standard(self) -> bool:
        """``linear(x, A)`` then ``linear(h, B)``: the pair read in the parameter's layout."""
        return (self.a is not None and self.b is not None and self.a.target == aten.linear.default
                and self.b.target == aten.linear.default)

    @property
    def scale_value(self) -> float:
        return float(self.scale.args[1]) if self.scale is not None else 1.0

    def input_consumers(self) -> list[fx.Node]:
        """The branch nodes that read the site's input directly (not through a quantizer)."""
        x = self.site.input
        return [n for n in self.ops if x in n.all_input_nodes]

    def a_value(self) -> torch.Tensor:
        """``A`` as the branch computes with it (fake-quantized when it is), ``(r, in)``."""
        return self._operand(self.a, "lora_A")

    def b_value(self) -> torch.Tensor:
        """``B`` as the branch computes with it, ``(out, r)``."""
        return self._operand(self.b, "lora_B")

    def delta(self) -> torch.Tensor:
        """``scale * B @ A`` from the weights the branch uses, in the parameter's stored layout;
        for DoRA the merged weight less the base weight (:func:`graphlora.dora.dora_delta`)."""
        spec = self.site.spec
        if self.dora:
            magnitude = evaluate(self.magnitude.graph.owning_module, self.magnitude).detach()
            return dora_delta(self.site.param_value().detach(), self.a_value(), self.b_value(),
                              self.scale_value, magnitude, spec.param_layout)
        shared = spec.site_kind == "experts" and self.a.target in (aten.linear.default, aten.matmul.default)
        return lora_delta(self.a_value(), self.b_value(), self.scale_value, spec, shared)

    def _operand(self, op: fx.Node | None, which: str) -> torch.Tensor:
        if op is None:
            raise PassError(f"LoRA branch at {self.site_key!r} ({self.adapter}) has no {which} op")
        if self.site.spec.site_kind in ("experts", "einsum"):  # the ops read views of the stored pair
            stored = self.a_weight if which == "lora_A" else self.b_weight
            return evaluate(op.graph.owning_module, stored).detach()
        if op.target == aten.embedding.default:  # embedding(A^T, ids): the lookup table is A^T
            return evaluate(op.graph.owning_module, op.args[0]).detach().t()
        return evaluate(op.graph.owning_module, op.args[1]).detach()


_FIELDS = {"lora_a": "a", "lora_b": "b", "lora_scale": "scale", "lora_dropout": "dropout",
           "lora_cast_in": "cast_in", "lora_cast_out": "cast_out", "dora_scale": "dora_scale"}
_WEIGHTS = {"lora_A": "a_weight", "lora_B": "b_weight", MAGNITUDE: "magnitude"}


def find_branches(gm: fx.GraphModule) -> list[LoraBranch]:
    """Every LoRA branch of ``gm``, in the graph order of their ``lora_add`` nodes."""
    sites = {s.spec.key: s for s in tagged_sites(gm)}
    members: dict[tuple[str, str], list[fx.Node]] = {}
    adds: list[fx.Node] = []
    for node in gm.graph.nodes:
        info = meta.info(node)
        adapter, key = info.get("adapter"), info.get("site_key")
        if adapter is None or key is None:
            continue
        members.setdefault((adapter, key), []).append(node)
        if info.get("role") == "lora_add":
            adds.append(node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    branches = []
    for add in adds:
        info = meta.info(add)
        site = sites.get(info["site_key"])
        if site is None:
            raise PassError(f"LoRA branch {add.name} (adapter {info['adapter']!r}) belongs to site "
                            f"{info['site_key']!r}, which is not a tagged linear site of the graph")
        br = LoraBranch(add, site, info["adapter"])
        nodes = members[(br.adapter, br.site_key)]
        for node in nodes:
            role = meta.role(node)
            if role in _FIELDS:
                setattr(br, _FIELDS[role], node)
            elif role == "weight" and meta.info(node).get("tensor") in _WEIGHTS:
                setattr(br, _WEIGHTS[meta.info(node)["tensor"]], node)
        br.quantizers = _quantizers(br)
        params = [p for q in br.quantizers for p in q.all_input_nodes
                  if p.op == "get_attr" and meta.info(p).get("adapter") is not None]
        br.owned = sorted({*nodes, *br.quantizers, *params}, key=order.__getitem__)
        branches.append(br)
    return branches


def _quantizers(br: LoraBranch) -> list[fx.Node]:
    """Fake-quant / observer nodes between the branch's ops and their inputs that belong to the
    branch: tagged with an adapter and the branch's module path (a quantizer of the site's own
    input has no adapter and is the base's)."""
    found: dict[fx.Node, None] = {}
    stack = [i for op in br.ops for i in op.all_input_nodes]
    while stack:
        node = stack.pop()
        info = meta.info(node)
        if (node in found or info.get("role") not in QUANTIZER_ROLES or info.get("adapter") is None
                or info.get("module_path") != br.module_path):
            continue
        found[node] = None
        stack.extend(node.all_input_nodes)
    return list(found)


def branches_by_site(gm: fx.GraphModule) -> dict[str, list[LoraBranch]]:
    """The branches of each site use (one per active adapter), by site key, in graph order."""
    out: dict[str, list[LoraBranch]] = {}
    for br in find_branches(gm):
        out.setdefault(br.site_key, []).append(br)
    return out


def remove(*branches: LoraBranch) -> None:
    """Take branches out of their graph: each branch's output (its ``add``, or the cast after it)
    is replaced by the add's base input, then every node the branches own that nothing reads
    any more is erased (a quantizer another branch still reads stays for it)."""
    if not branches:
        return
    for br in branches:
        br.output.replace_all_uses_with(br.add.args[0])
    owned = {n for br in branches for n in br.owned}
    graph = branches[0].add.graph
    for node in reversed(list(graph.nodes)):
        if node in owned and not node.users:
            graph.erase_node(node)


def check_no_lora(gm: fx.GraphModule, step: str) -> None:
    """Raise PassError when a node of some LoRA branch (by role or adapter tag) is left after
    ``step``, which promised to take every branch out."""
    left = [n for n in gm.graph.nodes
            if meta.role(n) in LORA_ROLES or meta.info(n).get("adapter") is not None]
    if left:
        info = meta.info(left[0])
        raise PassError(
            f"{step} left {len(left)} LoRA node(s) in the graph (first: {left[0].name}, adapter "
            f"{info.get('adapter')!r} at {info.get('module_path')!r})"
        )
