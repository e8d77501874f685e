"""Fold LoRA into the base weights: ``W <- W + scale * B @ A`` and drop the branches.

:class:`FoldLoraPass` is the one merge: read the deltas, take the branches out, give each weight
``W + delta``. Two passes fill it in. :class:`MergeLoraPass` (``LoraModel.merge``, merged saves)
merges adapters' stored pairs into *float* weights: a quantized weight read through dequantize
nodes is evaluated, so a merged QLoRA model becomes a float model. The merged weight keeps the
parameter's original name, so a merged model's state dict has the original model's keys. A
weight that is also read elsewhere (a tied embedding) is left as it is for those readers; the
merged copy gets its own name (``<name>__merged``). The export's merge
(:mod:`graphlora.passes.export_merge`) folds the branches as the graph runs them and stores the
result like the base was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.fx as fx

from graphlora import meta
from graphlora.adapters import ADAPTERS_ROOT, LoraSpec, lora_param_name
from graphlora.branches import check_no_lora, find_branches, lora_delta, remove
from graphlora.dora import MAGNITUDE, dora_delta
from graphlora.errors import PassError
from graphlora.graph_utils import get_tensor
from graphlora.passes.base import GraphPass, PassResult
from graphlora.passes.weights import drop_unread_tensors, groups_by_weight, replace_with_tensor
from graphlora.sites import LinearSite, tagged_sites


Deltas = dict[tuple[str, str], torch.Tensor]  # (weight name, module path) -> delta, param layout


class FoldLoraPass(GraphPass):
    """Take the branches out and give each (weight, module path) with a delta ``W + delta``.

    Subclasses say where the deltas come from (:meth:`deltas`, read before the branches go), how
    a weight tied across module paths is handled (:meth:`placements`) and how the merged weight
    is stored (:meth:`install`).
    """

    def deltas(self, gm: fx.GraphModule) -> Deltas:  # pragma: no cover - abstract
        raise NotImplementedError

    def placements(self, gm: fx.GraphModule, group: list[LinearSite], deltas: Deltas
                   ) -> list[tuple[str, list[LinearSite], str | None]]:
        """``(module path, sites, name)`` per merged tensor of one weight (see _by_module_path)."""
        return _by_module_path(gm, group)

    def install(self, gm: fx.GraphModule, sites: list[LinearSite], weight: torch.Tensor,
                name: str | None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def finish(self, gm: fx.GraphModule) -> None:
        """Clean-up after every weight is merged."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        deltas = self.deltas(gm)
        branches = find_branches(gm)
        remove(*branches)
        merged = False
        for weight_name, group in groups_by_weight(tagged_sites(gm)).items():
            for path, sites, name in self.placements(gm, group, deltas):
                delta = deltas.get((weight_name, path))
                if delta is None:
                    continue
                self.install(gm, sites, sites[0].param_value().detach().float() + delta, name)
                merged = True
        self.finish(gm)
        return PassResult(gm, merged or bool(branches))

    def ensures(self, gm: fx.GraphModule) -> None:
        check_no_lora(gm, self.name)


@dataclass
class MergeLoraPass(FoldLoraPass):
    """Merge the given adapters (name -> module path -> spec) into float base weights.

    The deltas come from each adapter's stored pair and its spec's scale, so adapters that are
    not active merge too; a quantized base is dequantized into the merged float weight.
    """

    adapters: Mapping[str, Mapping[str, LoraSpec]]

    def deltas(self, gm: fx.GraphModule) -> Deltas:
        out: Deltas = {}
        for weight_name, group in groups_by_weight(tagged_sites(gm)).items():
            for path in dict.fromkeys(s.module_path for s in group):
                # each path's own sites: a tied embedding stores its table (in, out), the lm_head
                # reading the same tensor sees it (out, in)
                sites = [s for s in group if s.module_path == path]
                found = [self._delta(gm, adapter, path, specs[path], sites)
                         for adapter, specs in self.adapters.items() if path in specs]
                if len(found) > 1 and any(specs[path].use_dora for specs in self.adapters.values()
                                          if path in specs):
                    raise PassError(
                        f"merging {len(found)} adapters at {path!r}, one of them DoRA: a DoRA merge "
                        "rescales the whole weight, so the result would depend on their order; "
                        "merge one adapter at a time")
                if found:
                    out[(weight_name, path)] = sum(found)
        return out

    @staticmethod
    def _delta(gm: fx.GraphModule, adapter: str, path: str, spec: LoraSpec, sites: list[LinearSite]) -> torch.Tensor:
        """One adapter's stored pair (and DoRA magnitude) as the change of the weight at ``path``."""
        a = get_tensor(gm, lora_param_name(adapter, path, "lora_A"))
        b = get_tensor(gm, lora_param_name(adapter, path, "lora_B"))
        if not spec.use_dora:
            return lora_delta(a, b, spec.scale, sites[0].spec, spec.share_experts)
        magnitude = get_tensor(gm, lora_param_name(adapter, path, MAGNITUDE))
        return dora_delta(sites[0].param_value().detach(), a, b, spec.scale, magnitude, sites[0].spec.param_layout)

    def install(self, gm: fx.GraphModule, sites: list[LinearSite], weight: torch.Tensor,
                name: str | None) -> None:
        merged = weight.to(getattr(torch, sites[0].spec.weight_dtype))
        replace_with_tensor(gm, sites, merged, suffix="merged", name=name)
        for site in sites:  # the merged weight is float, off any quantization grid
            meta.drop(site.node, "weight_qtype", "weight_encoding")

    def finish(self, gm: fx.GraphModule) -> None:
        drop_unread_tensors(gm)  # quantized storage the merge made obsolete is not saved
        gm._modules.pop(ADAPTERS_ROOT, None)


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
