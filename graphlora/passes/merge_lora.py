"""Fold LoRA into the base weights: ``W <- W + scale * B @ A`` and drop the branches.

Works on whatever weight a site computes with: a float parameter, or a quantized weight read
through dequantize nodes (which is evaluated, so a merged QLoRA model becomes a float model). The
merged weight keeps the parameter's original name, so a merged model's state dict has the
original model's keys. A weight that is also read elsewhere (a tied embedding) is left as it is
for those readers; the merged copy gets its own name (``<name>__merged``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from graphlora import meta
from graphlora.adapters import ADAPTERS_ROOT, LoraSpec, lora_param_name
from graphlora.graph_utils import delete_tensor, get_tensor
from graphlora.passes.base import GraphPass, PassResult
from graphlora.passes.insert_lora import RemoveLoraPass
from graphlora.passes.weights import groups_by_weight, replace_with_tensor
from graphlora.sites import tagged_sites


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
        modified = False
        for group in groups_by_weight(tagged_sites(gm)).values():
            for path, sites, name in _by_module_path(gm, group):
                deltas = [
                    lora_delta(gm, adapter, path, specs[path])
                    for adapter, specs in self.adapters.items()
                    if path in specs
                ]
                if not deltas:
                    continue
                spec = sites[0].spec
                base = sites[0].param_value().detach()
                delta = sum(deltas)
                delta = delta if spec.param_layout == "out_in" else delta.t()
                merged = (base.float() + delta).to(getattr(torch, spec.weight_dtype))
                replace_with_tensor(gm, sites, merged, suffix="merged", name=name)
                for site in sites:  # the merged weight is float, off any quantization grid
                    meta.drop(site.node, "weight_qtype", "weight_encoding")
                modified = True
        _drop_unread_graphlora_tensors(gm)
        gm._modules.pop(ADAPTERS_ROOT, None)
        return PassResult(gm, modified)


def _by_module_path(gm: fx.GraphModule, group: list) -> list[tuple[str, list, str | None]]:
    """The sites of one weight by module path: ``(path, sites, name)``.

    A weight tied across modules (one tensor read by sites of several module paths) gets each
    path's own adapter delta, so each path needs its own merged tensor. The path owning the
    parameter's name comes last and keeps the default naming (``name`` None); the others are
    stored as ``<their alias>__merged`` (e.g. ``blocks.0.lin.weight__merged``), which a merged
    save writes under the alias, untied.
    """
    paths: dict[str, list] = {}
    for site in group:
        paths.setdefault(site.module_path, []).append(site)
    if len(paths) == 1:
        return [(path, sites, None) for path, sites in paths.items()]
    weight_name = group[0].spec.weight_name
    head, _, leaf = weight_name.rpartition(".")
    owner = head if leaf == "weight" else weight_name  # as graphlora.sites names a site's path

    def alias(path: str) -> str:
        """The parameter's name under ``path``: ``<path>.weight``, or ``path`` itself for a bare
        parameter (the tensor may be gone already: a quantized weight is read through buffers)."""
        try:
            gm.get_submodule(path)
        except AttributeError:
            return path
        return f"{path}.weight"

    out, last = [], []
    for path, sites in paths.items():
        if path == owner:
            last.append((path, sites, None))
        else:
            out.append((path, sites, f"{alias(path)}__merged"))
    return out + last


def _drop_unread_graphlora_tensors(gm: fx.GraphModule) -> None:
    """Quantized storage a merge made obsolete is freed, not saved with the merged model."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()) + list(gm.named_parameters()):
        if name.startswith("graphlora_") and not name.startswith(ADAPTERS_ROOT) and name not in read:
            delete_tensor(gm, name)
