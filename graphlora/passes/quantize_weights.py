"""Quantize the base weights of matched sites.

Two storages, one set of encodings:

* ``"packed"`` (QLoRA): the weight is stored as integer codes — two 4-bit codes per byte for
  int4/uint4/nf4 — with its scales, in buffers under ``graphlora_quant.weight.<param>``; a single
  ``graphlora::dequantize*`` node rebuilds the float weight in forward. The float parameter is
  freed.
* ``"float"`` (QW-LoRA step 1, "apply the encodings to the weights"): the float weight is replaced
  by ``dequantize(quantize(W))`` — exactly on the grid — under its original name, and the encoding
  is kept in the site's metadata so later steps (export, the encodings file) reuse it exactly.

Encodings come from round-to-nearest calibration (``absmax``/``minmax``/``mse``), from GPTQ
(:mod:`graphlora.passes.gptq`), or from the user (a dict of precomputed encodings by parameter
name, e.g. loaded from an encodings file).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Mapping

import torch
import torch.fx as fx

from graphlora import meta
from graphlora.errors import PassError, QuantizationError, first_few
from graphlora.graph_utils import fake_mode, insert_call, insert_get_attr, set_tensor
from graphlora.passes.base import GraphPass, PassResult
from graphlora.passes.weights import dequant_node, groups_by_weight, replace_with_node, replace_with_tensor
from graphlora.quant import Encoding, calibrate_weight, get_qtype
from graphlora.rules import QuantRule
from graphlora.sites import LinearSite, tagged_sites

Storage = Literal["packed", "float"]
QUANT_ROOT = "graphlora_quant"
WEIGHT_ROOT = f"{QUANT_ROOT}.weight"


def weight_axis(site: LinearSite) -> int:
    """Axis of the stored parameter that gets its own scales: the output channels, 0 for
    (out, in) and for a convolution's (out, in / groups, *kernel), 1 for (in, out); an
    embedding's rows (axis 0, blocks along ``dim``), as a lookup reads them one token at a time."""
    return 0 if site.spec.param_layout == "out_in" or site.spec.site_kind == "embedding" else 1


def default_scale_dtype(qtype: str, double_quant: bool) -> torch.dtype:
    """fp16 scales for 4-bit codes: 4.25 bits/param at group 64 (fp32 scales would cost 4.5)."""
    qt = get_qtype(qtype)
    if qt.packed and not double_quant:
        return torch.float16
    return torch.float32


def rule_encoding(site: LinearSite, rule: QuantRule, weight: torch.Tensor) -> Encoding:
    """Round-to-nearest encoding of one parameter according to its rule."""
    method = rule.weight_calibration
    if rule.weight_method.needs_data:
        raise QuantizationError(
            f"site {site.module_path!r}: weight_calibration={method!r} needs calibration data; pass "
            "calibration_data=... to transform() or use the QW-LoRA workflow (graphlora.qw_lora)"
        )
    double_quant = bool(rule.double_quant and get_qtype(rule.weight_qtype).kind == "nf4")
    return calibrate_weight(
        weight,
        rule.weight_qtype,
        method=method,
        axis=weight_axis(site),
        block_size=rule.group_size,
        symmetric=rule.weight_symmetric,
        scale_dtype=default_scale_dtype(rule.weight_qtype, double_quant),
        double_quant=double_quant,
        name=site.spec.weight_name,
        grid=rule.weight_grid,
    )


def install_encoding(
    gm: fx.GraphModule,
    sites: list[LinearSite],
    encoding: Encoding,
    storage: Storage,
    *,
    weight: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    method: str | None = None,
) -> None:
    """Quantize one parameter group with ``encoding`` and rewire its sites.

    ``codes`` (e.g. from GPTQ) are used as they are; otherwise ``weight`` (default: the current
    weight of the group) is quantized with the encoding.
    """
    spec = sites[0].spec
    name = spec.weight_name
    encoding = replace(encoding, name=name)
    if codes is None:
        w = sites[0].param_value().detach() if weight is None else weight
        if tuple(w.shape) != tuple(encoding.shape):
            raise QuantizationError(
                f"encoding for {name!r} was made for shape {tuple(encoding.shape)}, the weight "
                f"has shape {tuple(w.shape)}"
            )
        codes = encoding.quantize(w)
    dtype = getattr(torch, spec.weight_dtype)
    info = dict(
        module_path=spec.module_path,
        tensor=name,
        qtype=encoding.qtype.name,
        block_size=encoding.block_size,
        axis=encoding.axis,
        encoding=encoding,
        method=method,
    )
    if storage == "float":
        on_grid = encoding.dequantize(codes, dtype)
        replace_with_tensor(gm, sites, on_grid, suffix="quantized")
        for site in sites:
            meta.tag(site.node, "base", weight_encoding=encoding, weight_method=method)
        return
    if storage != "packed":
        raise QuantizationError(f"unknown weight storage {storage!r}; use 'packed' or 'float'")
    op, args = encoding.storage_op(encoding.pack(codes), dtype)
    schema_args = op._schema.arguments
    mode = fake_mode(gm)

    def build() -> fx.Node:
        node_args = []
        for arg_schema, value in zip(schema_args, args):
            if isinstance(value, torch.Tensor):
                qual = f"{WEIGHT_ROOT}.{name}.{arg_schema.name}"
                set_tensor(gm, qual, value.detach().clone(), parameter=False)
                node_args.append(
                    insert_get_attr(gm.graph, qual, role="weight", mode=mode,
                                    module_path=spec.module_path, tensor=name)
                )
            else:
                node_args.append(value)
        return insert_call(gm.graph, op, tuple(node_args), role="dequant", mode=mode, **info)

    replace_with_node(gm, sites, build)
    for site in sites:
        meta.tag(site.node, "base", weight_qtype=encoding.qtype.name)


@dataclass
class QuantizeWeightsPass(GraphPass):
    """Round-to-nearest (or user-supplied) quantization of every site whose rule asks for it.

    ``encodings`` maps parameter names to precomputed :class:`Encoding` objects, which win over
    the rules' calibration methods (QW-LoRA with encodings computed elsewhere). Sites whose rule
    says ``gptq`` are left for :class:`graphlora.passes.gptq.GPTQPass` unless an encoding is given.
    """

    storage: Storage = "packed"
    encodings: Mapping[str, Encoding] | None = None
    #: With ``encodings``: every weight a rule quantizes must have one (none is computed).
    complete: bool = False
    quantized: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"QuantizeWeightsPass[{self.storage}]"

    def call(self, gm: fx.GraphModule) -> PassResult:
        given = dict(self.encodings or {})
        self.quantized = []
        if self.complete:
            _refuse_unknown(gm, {k for k in given if k not in groups_by_weight(tagged_sites(gm))})
            _require_all_given(gm, given)
        for name, sites in groups_by_weight(tagged_sites(gm)).items():
            rule = sites[0].rule
            if _already_quantized(sites):
                continue
            if name in given:
                install_encoding(gm, sites, given.pop(name), self.storage, method="given")
            elif rule is not None and rule.weight_qtype and not rule.needs_calibration_data:
                weight = sites[0].param_value().detach()
                enc = rule_encoding(sites[0], rule, weight)
                install_encoding(gm, sites, enc, self.storage, weight=weight, method=rule.weight_calibration)
            else:
                continue
            self.quantized.append(name)
        _refuse_unknown(gm, set(given))
        return PassResult(gm, bool(self.quantized))

    def ensures(self, gm: fx.GraphModule) -> None:
        check_quantized(gm, self.quantized, self.storage, self.name)


def _refuse_unknown(gm: fx.GraphModule, unknown: set[str]) -> None:
    if unknown:
        known = sorted({s.spec.weight_name for s in tagged_sites(gm)})
        raise QuantizationError(
            "encodings were given for weights that are not matched sites: "
            + ", ".join(sorted(unknown)[:5])
            + (f" (matched weights include {', '.join(known[:3])})" if known else "")
        )


def _require_all_given(gm: fx.GraphModule, given: Mapping[str, Encoding]) -> None:
    lacking = sorted(
        name
        for name, sites in groups_by_weight(tagged_sites(gm)).items()
        if sites[0].rule is not None and sites[0].rule.weight_qtype and name not in given
        and not _already_quantized(sites)
    )
    if lacking:
        raise QuantizationError(
            f"the encodings given lack {len(lacking)} weight(s) the rules quantize: {first_few(lacking)}. "
            "Given encodings are used instead of computing any, so give one for every quantized "
            "weight, or call quantize_base() without encodings to compute them all"
        )


def check_quantized(gm: fx.GraphModule, names: list[str], storage: Storage, pass_name: str) -> None:
    """Every site of each weight in ``names`` computes with its quantization: packed storage
    through a dequantize node, float storage with the encoding recorded on the site."""
    wanted = set(names)
    wrong = []
    for site in tagged_sites(gm):
        if site.spec.weight_name not in wanted:
            continue
        ok = dequant_node(site) is not None if storage == "packed" else "weight_encoding" in meta.info(site.node)
        if not ok:
            wrong.append(site.spec.key)
    if wrong:
        raise PassError(f"{pass_name}: quantized weights not read through their quantization at "
                        f"{', '.join(wrong[:5])}")


def _already_quantized(sites: list[LinearSite]) -> bool:
    info = meta.info(sites[0].node)
    return "weight_qtype" in info or "weight_encoding" in info
