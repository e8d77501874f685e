"""Fold LoRA into the base weights: ``W <- W + scale * B @ A`` and drop the branches.

Works on whatever weight a site computes with: a float parameter, or a quantized weight read
through dequantize nodes (which is evaluated, so a merged QLoRA model becomes a float model). The
merged weight keeps the parameter's original name, so a merged model's state dict has the
original model's keys. A weight that is also read elsewhere (a tied embedding) is left as it is
for those readers; the merged copy gets its own name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from graphlora.adapters import ADAPTERS_ROOT, LoraSpec, lora_param_name
from graphlora.graph_utils import (
    delete_tensor,
    fake_mode,
    get_tensor,
    insert_get_attr,
    remove_dead_nodes,
    set_tensor,
)
from graphlora.passes.base import GraphPass, PassResult
from graphlora.passes.insert_lora import RemoveLoraPass
from graphlora.sites import LinearSite, iter_site_groups, tagged_sites


def lora_delta(gm: nn.Module, adapter: str, path: str, spec: LoraSpec) -> torch.Tensor:
    """scale * B @ A in PEFT orientation (out, in) of the parameter, computed in float32."""
    a = get_tensor(gm, lora_param_name(adapter, path, "lora_A")).detach().float()
    b = get_tensor(gm, lora_param_name(adapter, path, "lora_B")).detach().float()
    return (b @ a) * spec.scale


@dataclass
class MergeLoraPass(GraphPass):
    """Merge the given adapters (name -> module path -> spec) into the base weights."""

    adapters: Mapping[str, Mapping[str, LoraSpec]]

    def call(self, gm: fx.GraphModule) -> PassResult:
        RemoveLoraPass().call(gm)
        mode = fake_mode(gm)
        replaced: list[str] = []
        modified = False
        for path, sites in iter_site_groups(tagged_sites(gm)):
            deltas = [
                lora_delta(gm, name, path, specs[path])
                for name, specs in self.adapters.items()
                if path in specs
            ]
            if not deltas:
                continue
            modified = True
            _merge_group(gm, sites, sum(deltas), mode)
            replaced.append(sites[0].spec.weight_name)
        remove_dead_nodes(gm)
        _drop_unread(gm, replaced)
        _finalise_names(gm, replaced)
        gm._modules.pop(ADAPTERS_ROOT, None)
        return PassResult(gm, modified)


def _merge_group(gm: fx.GraphModule, sites: list[LinearSite], delta: torch.Tensor, mode) -> None:
    spec = sites[0].spec
    base = sites[0].param_value().detach()
    delta_param = delta if spec.param_layout == "out_in" else delta.t()
    merged = (base.float() + delta_param).to(getattr(torch, spec.weight_dtype))
    temp = f"{spec.weight_name}__merged"
    set_tensor(gm, temp, nn.Parameter(merged, requires_grad=False), parameter=True)
    for site in sites:
        with gm.graph.inserting_before(site.node):
            read = insert_get_attr(gm.graph, temp, mode=mode)
        site.feed_param(read)


def _drop_unread(gm: fx.GraphModule, names: list[str]) -> None:
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in names:
        if name not in read:
            delete_tensor(gm, name)
    for name, _ in list(gm.named_buffers()) + list(gm.named_parameters()):
        if name.startswith("graphlora_") and not name.startswith(ADAPTERS_ROOT) and name not in read:
            delete_tensor(gm, name)


def _finalise_names(gm: fx.GraphModule, names: list[str]) -> None:
    """Give merged weights their original names where nothing else still reads the original."""
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in names:
        temp = f"{name}__merged"
        if name in still_read:
            continue  # tied: the original still serves other readers
        set_tensor(gm, name, get_tensor(gm, temp), parameter=True)
        delete_tensor(gm, temp)
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target == temp:
                node.target = name
