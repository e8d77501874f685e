"""Make a fresh trace of the model the twin of a graph that passes already rewrote.

A LoraModel serves calls of several structures (labels or not, ``output_hidden_states``, ...),
each with its own traced graph (:mod:`graphlora.call_graphs`). The graph of ``transform`` is the
*reference*: the rules were matched on it, its weights quantized (from data, for GPTQ), its
activations calibrated. A new trace must compute exactly what the reference computes, without
recomputing any of that — the float weights a QLoRA transform quantized are gone, and the
calibration data is not at hand. These passes copy what the reference recorded:

* :class:`ReplicateSitesPass` tags every linear site as the reference's site with the same key
  (rule, encodings) and makes it compute its weight as the reference does: the reference's
  dequantize node, reading the same packed buffers, instead of the parameter the trace read.
* :class:`ReplicateQuantizersPass` puts each of the reference's fake-quant nodes and observers
  at the same uses, reading the same scale buffers and observer modules.

LoRA branches are not copied: :class:`~graphlora.passes.insert_lora.InsertLoraPass` inserts them
(the same pass the reference got), finding the adapter weights instead of creating them.
Nodes are matched by what graphlora's metadata says they are — the site key of a linear site,
``(role, adapter, site key)`` of a branch node — never by name or position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch.fx as fx
import torch.nn as nn

from graphlora import meta
from graphlora.branches import LORA_ROLES, QUANTIZER_ROLES
from graphlora.errors import PassError
from graphlora.graph_utils import erase_unused_chain, fake_mode, get_tensor, propagate_val, set_tensor
from graphlora.passes.base import GraphPass, PassResult
from graphlora.passes.weights import dequant_node
from graphlora.rules import QuantRule, first_match
from graphlora.sites import LinearSite, find_linear_sites, tagged_sites

__all__ = ["ReplicateQuantizersPass", "ReplicateSitesPass", "node_identity"]

_SITE_FIELDS = ("rule", "rule_index", "weight_qtype", "weight_encoding", "weight_method")


def node_identity(node: fx.Node) -> tuple | None:
    """What a node is, independent of the graph it is in: ``("base", site key)`` for a linear
    site, ``(role, adapter, site key)`` for a LoRA branch node, ``("weight", adapter, site key,
    tensor)`` for a read of a LoRA factor, ``(role, tensor, adapter)`` for a quantizer."""
    info = meta.info(node)
    role = info.get("role")
    if role == "base" and "site" in info:
        return ("base", info["site"].key)
    if role in LORA_ROLES:
        return (role, info.get("adapter"), info.get("site_key"))
    if role == "weight" and info.get("adapter") is not None:
        return ("weight", info["adapter"], info.get("site_key"), info.get("tensor"))
    if role in QUANTIZER_ROLES:
        return (role, info.get("tensor"), info.get("adapter"))
    return None


class _Copier:
    """Copies constant subgraphs (tensor reads and what is computed from them) of the reference
    into ``gm``, each reference node once; a tensor ``gm`` lacks is registered from the reference
    (the same object)."""

    def __init__(self, gm: fx.GraphModule, reference: fx.GraphModule):
        self.gm, self.reference = gm, reference
        self.mode = fake_mode(gm)
        self.copies: dict[fx.Node, fx.Node] = {}

    def constant(self, node: fx.Node, before: fx.Node) -> fx.Node:
        if node in self.copies:
            return self.copies[node]
        graph = self.gm.graph
        if node.op == "get_attr":
            self._ensure_tensor(str(node.target))
            with graph.inserting_before(before):
                new = graph.get_attr(node.target)
        elif node.op == "call_function":
            args = fx.node.map_arg(node.args, lambda n: self.constant(n, before))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: self.constant(n, before))
            with graph.inserting_before(before):
                new = graph.call_function(node.target, args, kwargs)
        else:
            raise PassError(f"cannot replicate {node.op} node {node.name}: a site's weight must be "
                            "computed from module tensors only")
        return self._finish(node, new)

    def _finish(self, node: fx.Node, new: fx.Node) -> fx.Node:
        _copy_meta(node, new)
        propagate_val(new, self.mode)
        self.copies[node] = new
        return new

    def _ensure_tensor(self, target: str) -> None:
        try:
            get_tensor(self.gm, target)
        except AttributeError:
            value = get_tensor(self.reference, target)
            set_tensor(self.gm, target, value, parameter=isinstance(value, nn.Parameter))


def _reads_same_parameter(site: LinearSite, ref: LinearSite) -> bool:
    """Whether both sites feed the op the same parameter read the same way (nothing to rewire)."""
    a, b = site.weight_input, ref.weight_input
    if site.spec.weight_transposed != ref.spec.weight_transposed:
        return False
    if site.spec.weight_transposed:
        a, b = a.args[0], b.args[0]
    return a.op == b.op == "get_attr" and a.target == b.target


@dataclass
class ReplicateSitesPass(GraphPass):
    """Tag the linear sites of a fresh trace like the reference's and give them its weights.

    A site the reference does not have (a layer only some calls run) is tagged by ``rules``,
    first match wins, and keeps its float weight.
    """

    reference: fx.GraphModule
    rules: Sequence[QuantRule]
    rewired: list[str] = field(default_factory=list)

    def call(self, gm: fx.GraphModule) -> PassResult:
        ref_sites = {s.spec.key: s for s in tagged_sites(self.reference)}
        copier = _Copier(gm, self.reference)
        self.rewired = []
        modified = False
        for site in find_linear_sites(gm):
            ref = ref_sites.get(site.spec.key)
            if ref is None:
                match = first_match(site.module_path, self.rules)
                if match is not None:
                    meta.tag(site.node, "base", module_path=site.module_path, site=site.spec,
                             rule=match.rule, rule_index=match.index)
                    modified = True
                continue
            info = meta.info(ref.node)
            meta.tag(site.node, "base", module_path=site.module_path, site=site.spec,
                     **{k: info[k] for k in _SITE_FIELDS if k in info})
            modified = True
            if not _reads_same_parameter(site, ref):
                old = site.weight_input
                site.replace_weight_input(copier.constant(ref.weight_input, before=site.node))
                erase_unused_chain([old])
                self.rewired.append(site.spec.key)
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        ref_sites = {s.spec.key: s for s in tagged_sites(self.reference)}
        for site in tagged_sites(gm):
            ref = ref_sites.get(site.spec.key)
            if ref is not None and (dequant_node(site) is None) != (dequant_node(ref) is None):
                raise PassError(f"{self.name}: site {site.spec.key!r} does not read its weight through "
                                "the same quantization as in the reference graph")


@dataclass
class ReplicateQuantizersPass(GraphPass):
    """Put the reference's fake-quant nodes and observers on the same values, at the same uses.

    A quantizer is found again through its users: each is a node with an identity
    (:func:`node_identity`: a site, a branch op, another quantizer); the value it quantizes is
    what that user's counterpart reads at the same argument position. Scale and zero-point
    buffers and observer modules live in graphlora's own trees, shared with the reference, so
    the copy reads the same tensors (and an observer collects into the same statistics).
    """

    reference: fx.GraphModule
    copied: list[str] = field(default_factory=list)

    def call(self, gm: fx.GraphModule) -> PassResult:
        index = {ident: n for n in gm.graph.nodes if (ident := node_identity(n)) is not None}
        copier = _Copier(gm, self.reference)
        self.copied = []
        for q in self.reference.graph.nodes:
            if meta.role(q) not in QUANTIZER_ROLES:
                continue
            uses = []
            for user in q.users:
                counterpart = index.get(node_identity(user))
                if counterpart is not None and q in user.args:
                    uses.append((counterpart, user.args.index(q)))
            if not uses:
                if any(node_identity(user) is None for user in q.users):
                    # a whole-graph activation encoding (on a norm, an add, a softmax...): its users
                    # have no identity across graphs, and leaving it out would silently run this
                    # call without it
                    raise PassError(
                        f"{self.name}: the activation encoding of {meta.info(q).get('tensor')} (whole-graph "
                        "placement, graphlora.calibrate(..., activations=...)) cannot be carried to "
                        "another call structure yet; call the model as it was traced, or transform it "
                        "with an example of this call"
                    )
                continue
            value = uses[0][0].args[uses[0][1]]
            new = self._copy(gm, copier, q, value)
            for counterpart, position in uses:
                args = list(counterpart.args)
                args[position] = new
                counterpart.args = tuple(args)
            index[node_identity(q)] = new
            self.copied.append(str(meta.info(q).get("tensor")))
        return PassResult(gm, bool(self.copied))

    def _copy(self, gm: fx.GraphModule, copier: _Copier, q: fx.Node, value: fx.Node) -> fx.Node:
        graph = gm.graph
        anchor = value.next
        if q.op == "call_module":  # an observer: the same module, so statistics are shared
            with graph.inserting_before(anchor):
                new = graph.call_module(q.target, (value,))
        else:
            rest = [copier.constant(a, before=anchor) if isinstance(a, fx.Node) else a for a in q.args[1:]]
            with graph.inserting_before(anchor):
                new = graph.call_function(q.target, (value, *rest), dict(q.kwargs))
        _copy_meta(q, new)
        if "val" in value.meta:  # quantizers keep their input's shape and dtype
            new.meta["val"] = value.meta["val"]
        return new


def _copy_meta(node: fx.Node, new: fx.Node) -> None:
    """graphlora's metadata (dicts are replaced, never edited, so sharing is safe) and the module
    stack (block splitting and graph text read it)."""
    for key in (meta.META_KEY, "nn_module_stack"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
