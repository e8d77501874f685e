"""Replacing the weight a group of sites computes with — the one mechanism weight passes share.

A "group" is every use of one parameter (a weight applied at several places is one group). Two
kinds of replacement exist: a new float tensor (merged LoRA, on-grid QW-LoRA weights) and a
dequantize node reading packed buffers (QLoRA storage). Either way the sites are rewired through
:meth:`LinearSite.feed_param`, dead reads are removed, and a parameter nothing reads any more is
dropped — or, for a float replacement, the new tensor takes over its name so state-dict keys stay
those of the original model. A parameter that other nodes still read (a tied embedding) is left
to them, and the replacement keeps a name of its own.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from graphlora import meta
from graphlora.graph_utils import (
    delete_tensor,
    fake_mode,
    get_tensor,
    insert_get_attr,
    is_own,
    erase_unused_chain,
    set_tensor,
)
from graphlora.sites import LinearSite


def weight_readers(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name]


def replace_with_tensor(
    gm: fx.GraphModule,
    sites: list[LinearSite],
    value: torch.Tensor,
    *,
    suffix: str | None = None,
    name: str | None = None,
    staging: str | None = None,
) -> str:
    """Make ``sites`` compute with float ``value`` (parameter layout); return its final name.

    ``value`` is stored under ``staging`` (default ``<param>__<suffix>``) and takes over the
    parameter's name when nothing else reads the parameter any more. ``name`` stores it under
    exactly that name, never renamed (for sites that read a tied weight under another module
    path and get a value of their own).
    """
    original = sites[0].spec.weight_name
    if name is None and staging is None and suffix is None:
        raise ValueError("replace_with_tensor needs a suffix, a staging name or a name")
    temp = name or staging or f"{original}__{suffix}"
    set_tensor(gm, temp, nn.Parameter(value.detach(), requires_grad=False), parameter=True)
    mode = fake_mode(gm)
    old = [s.weight_input for s in sites]
    for site in sites:
        with gm.graph.inserting_before(site.node):
            read = insert_get_attr(gm.graph, temp, mode=mode)
        site.feed_param(read)
    erase_unused_chain(old)
    if name is not None or weight_readers(gm, original):
        return temp  # still read elsewhere (tied): both live on under their own names
    set_tensor(gm, original, get_tensor(gm, temp), parameter=True)
    delete_tensor(gm, temp)
    for node in weight_readers(gm, temp):
        node.target = original
    return original


def replace_with_node(gm: fx.GraphModule, sites: list[LinearSite], build) -> fx.Node:
    """Make ``sites`` compute with the node ``build()`` creates (inserted before the first site).

    The original parameter is deleted when nothing reads it any more, which is where QLoRA's
    memory saving comes from.
    """
    original = sites[0].spec.weight_name
    first = min(sites, key=lambda s: _position(gm, s.node))
    with gm.graph.inserting_before(first.node):
        new = build()
    old = [s.weight_input for s in sites]
    for site in sites:
        site.feed_param(new)
    erase_unused_chain(old)
    if not weight_readers(gm, original):
        delete_tensor(gm, original)
    return new


def _position(gm: fx.GraphModule, node: fx.Node) -> int:
    for i, n in enumerate(gm.graph.nodes):
        if n is node:
            return i
    raise ValueError(f"node {node.name} is not in the graph")


def dequant_node(site: LinearSite) -> fx.Node | None:
    """The ``dequant`` node a site's weight is computed from (through its transpose), if any."""
    node = site.weight_input
    for _ in range(3):
        if meta.role(node) == "dequant":
            return node
        if node.op != "call_function" or not node.all_input_nodes:
            return None
        node = node.all_input_nodes[0]
    return None


def drop_unread_tensors(gm: fx.GraphModule) -> int:
    """Free graphlora's own tensors (``graphlora_*``: quantized storage, adapters, encodings) that
    no node reads any more, so they are not saved or exported; returns how many."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    unread = [name for name, _ in list(gm.named_parameters()) + list(gm.named_buffers())
              if is_own(name) and name not in read]
    for name in unread:
        delete_tensor(gm, name)
    return len(unread)


def groups_by_weight(sites: list[LinearSite]) -> dict[str, list[LinearSite]]:
    """Sites keyed by the parameter they read, in graph order."""
    groups: dict[str, list[LinearSite]] = {}
    for s in sites:
        groups.setdefault(s.spec.weight_name, []).append(s)
    return groups
