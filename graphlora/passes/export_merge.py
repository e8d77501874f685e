"""``lora="merged"`` export: fold each branch into its base weight, then store it as the base was.

``W' = W + scale * B @ A`` is computed from the weights the branch actually uses (fake-quantized
LoRA weights included: that is the function the model computes), and ``W'`` is stored like the
base:

* a base stored quantized (QLoRA) gets a *re-computed* encoding of the same qtype, granularity,
  symmetry, scale dtype and double quantization, with the site's calibration method
  (absmax/minmax/mse; GPTQ, which needs data, falls back to absmax or minmax by symmetry), so
  the merged delta is never clipped by ranges calibrated without it;
* a float base on a quantization grid (QW-LoRA, ``weight_encoding``) is quantized with exactly
  that encoding — reused, the LoRA was trained for that grid;
* a float base stays float.

One tensor holds one merged value, so a weight tied across module paths (each with its own
delta) is refused here; ``lora="branch"`` exports it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphlora import meta
from graphlora.branches import find_branches
from graphlora.errors import ExportError, PassError
from graphlora.passes.export_base import ExportPass
from graphlora.passes.export_grid import store_on_grid
from graphlora.passes.merge_lora import Deltas, FoldLoraPass
from graphlora.passes.quantize_weights import install_encoding
from graphlora.passes.weights import dequant_node, replace_with_tensor
from graphlora.quant import Encoding, calibrate_weight, data_free_method
from graphlora.sites import LinearSite

EXPORT_ROOT = "graphlora_export"


class MergeLoraForExportPass(ExportPass, FoldLoraPass):
    """Fold every branch in the graph into its base weight, re-quantized like the base."""

    def deltas(self, gm: fx.GraphModule) -> Deltas:
        out: Deltas = {}
        counted: set[tuple[str, str]] = set()
        for br in find_branches(gm):
            if (br.module_path, br.adapter) in counted:  # a weight used twice carries its pair twice
                continue
            counted.add((br.module_path, br.adapter))
            key = (br.site.spec.weight_name, br.module_path)
            try:
                delta = br.delta()
            except PassError as exc:  # a pair no weight can hold (a grouped convolution's)
                raise ExportError(f"lora='merged' at {br.module_path!r}: {exc}") from None
            out[key] = out[key] + delta if key in out else delta
        return out

    def placements(self, gm: fx.GraphModule, group: list[LinearSite], deltas: Deltas
                   ) -> list[tuple[str, list[LinearSite], str | None]]:
        name = group[0].spec.weight_name
        paths = sorted({s.module_path for s in group})
        if len(paths) > 1 and any((name, p) in deltas for p in paths):
            raise ExportError(
                f"lora='merged' cannot fold LoRA into {name!r}: the weight is tied across module "
                f"paths {', '.join(paths)}, which would need different merged weights; export with "
                "lora='branch'"
            )
        return [(paths[0], group, None)]

    def install(self, gm: fx.GraphModule, sites: list[LinearSite], weight: torch.Tensor,
                name: str | None) -> None:
        dq = dequant_node(sites[0])
        grid = meta.info(sites[0].node).get("weight_encoding")
        if dq is not None:
            encoding = meta.info(dq).get("encoding")
            if encoding is None:
                raise ExportError(f"quantized weight {sites[0].spec.weight_name!r} has no encoding in "
                                  "its dequant node metadata; cannot re-quantize the merged weight")
            method = meta.info(dq).get("method") or getattr(sites[0].rule, "weight_calibration", None)
            method = _round_to_nearest(encoding, method)
            install_encoding(gm, sites, _recomputed(encoding, weight, method), "packed",
                             weight=weight, method=method)
        elif grid is not None:
            store_on_grid(gm, sites, grid, weight)
        else:
            spec = sites[0].spec
            replace_with_tensor(gm, sites, weight.to(getattr(torch, spec.weight_dtype)),
                                staging=f"{EXPORT_ROOT}.{spec.weight_name}")


def _round_to_nearest(encoding: Encoding, method: str | None) -> str:
    """The calibration method a merged weight is re-quantized with: the registry's data-free
    stand-in for the base's own method on the encoding's grid (no calibration data exists at
    export); non-integer qtypes always use absmax."""
    if encoding.qtype.kind != "int":
        return "absmax"
    return data_free_method(method, encoding.symmetric)


def _recomputed(encoding: Encoding, weight: torch.Tensor, method: str) -> Encoding:
    """A fresh encoding for ``weight`` shaped like ``encoding`` (qtype, granularity, symmetry,
    scale dtype, double quantization)."""
    return calibrate_weight(
        weight, encoding.qtype, method=method, axis=encoding.axis, block_size=encoding.block_size,
        symmetric=encoding.symmetric, scale_dtype=encoding.scale.dtype,
        double_quant=encoding.double_quant is not None, name=encoding.name,
    )
