"""QW-LoRA's grid weights stored as what they are: codes read through one dequantize node.

A float base weight with a ``weight_encoding`` (QW-LoRA's "apply the encodings to the weights")
sits exactly on its quantization grid, so quantizing it with that encoding recovers the codes
exactly. For export it is stored packed — the one form of a quantized weight the ONNX lowering
knows — with the encoding it was trained for, never a recomputed one.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphlora import meta
from graphlora.errors import PassError
from graphlora.passes.base import PassResult
from graphlora.passes.export_base import ExportPass
from graphlora.passes.quantize_weights import install_encoding
from graphlora.passes.weights import dequant_node, groups_by_weight
from graphlora.quant import Encoding
from graphlora.sites import LinearSite, tagged_sites


def store_on_grid(gm: fx.GraphModule, sites: list[LinearSite], encoding: Encoding,
                  weight: torch.Tensor) -> None:
    """Store ``weight`` packed with the group's grid ``encoding``; the sites read it dequantized."""
    method = meta.info(sites[0].node).get("weight_method")
    install_encoding(gm, sites, encoding, "packed", weight=weight, method=method)
    for site in sites:
        meta.drop(site.node, "weight_encoding")


class StoreGridWeightsPass(ExportPass):
    """Every grid weight (``weight_encoding``) becomes packed storage with exactly that encoding."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        stored = False
        for sites in groups_by_weight(tagged_sites(gm)).values():
            encoding = meta.info(sites[0].node).get("weight_encoding")
            if encoding is None or dequant_node(sites[0]) is not None:
                continue
            store_on_grid(gm, sites, encoding, sites[0].param_value().detach().float())
            stored = True
        return PassResult(gm, stored)

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [s.module_path for s in tagged_sites(gm)
                if "weight_encoding" in meta.info(s.node) and dequant_node(s) is None]
        if left:
            raise PassError(f"{self.name} left grid weights unstored at {', '.join(left[:5])}")
