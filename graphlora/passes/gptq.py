"""GPTQ as a graph pass driven by calibration data (Frantar et al., 2022).

Each weight is quantized from the Hessian ``H = 2 X^T X / n`` of the inputs its site sees, and the
layers run *sequentially*: a weight's Hessian is collected with every weight it depends on
already quantized, so it compensates its predecessors' error too. Sequencing is by waves of the
graph's dependency order — sites whose inputs do not depend on each other (query, key and value
of one attention block) share a wave and one pass over the data; sites that read the same input
share one Hessian. Collection inserts capture modules on the sites' inputs for one wave, runs the
batches, and stops each forward right after the wave's last capture, so a wave in layer 3 costs
three layers of compute, not the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from graphlora import meta
from graphlora import batches as batch_feed
from graphlora.collectives import is_initialized, sync_stats
from graphlora.errors import CalibrationError, QuantizationError
from graphlora.graph_utils import ensure_container
from graphlora.passes.base import GraphPass, PassResult
from graphlora.passes.quantize_weights import (
    Storage,
    check_quantized,
    default_scale_dtype,
    install_encoding,
    weight_axis,
)
from graphlora.passes.weights import groups_by_weight
from graphlora.quant import HessianAccumulator, gptq_quantize
from graphlora.sites import LinearSite, tagged_sites

CAPTURE_ROOT = "graphlora_gptq_capture"


class _StopForward(Exception):
    """Raised by the last capture of a wave: the rest of the forward is not needed."""


class _Capture(nn.Module):
    def __init__(self, accumulator: HessianAccumulator, stop: bool):
        super().__init__()
        self.accumulator = accumulator
        self.stop = stop

    def forward(self, x):
        self.accumulator.add(x.detach())
        if self.stop:
            raise _StopForward
        return x


@dataclass
class GPTQPass(GraphPass):
    """Quantize every site whose rule says ``weight_calibration="gptq"``, sequentially."""

    batches: Iterable[Any]
    storage: Storage = "packed"
    num_batches: int | None = None
    progress: bool = True
    percdamp: float = 0.01
    #: the registered weight-calibration method this pass runs (graphlora.quant.weight_methods)
    method: str = "gptq"
    quantized: list[str] = field(default_factory=list)

    def call(self, gm: fx.GraphModule) -> PassResult:
        groups = {
            name: sites
            for name, sites in groups_by_weight(tagged_sites(gm)).items()
            if sites[0].rule is not None
            and sites[0].rule.weight_qtype
            and sites[0].rule.weight_calibration == self.method
            and "weight_qtype" not in meta.info(sites[0].node)
            and "weight_encoding" not in meta.info(sites[0].node)
        }
        if not groups:
            return PassResult(gm, False)
        if self.batches is None:
            raise CalibrationError("GPTQ needs calibration data: pass calibration_data=... (batches)")
        data = list(batch_feed.iterate(self.batches, num_batches=self.num_batches, progress=False))
        if not data:
            raise CalibrationError("GPTQ got no calibration batches")
        for sites in groups.values():
            if any(s.spec.use_layout != s.spec.param_layout for s in sites):
                raise QuantizationError(
                    f"GPTQ on {sites[0].spec.weight_name!r}: the weight is read in both "
                    "orientations, so its inputs have no single Hessian; use absmax/mse for it"
                )
        waves = dependency_waves(gm, groups)
        self.quantized = []
        bar = _progress(len(waves), self.progress)
        for wave in waves:
            hessians = self._collect(gm, {name: groups[name] for name in wave}, data)
            for name in wave:
                self._quantize(gm, groups[name], hessians[name])
                self.quantized.append(name)
            # the graph changed: fresh site handles for the next wave
            current = groups_by_weight(tagged_sites(gm))
            groups = {n: current[n] for n in groups if n in current}
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        check_quantized(gm, self.quantized, self.storage, self.name)

    def _collect(self, gm: fx.GraphModule, wave: dict[str, list[LinearSite]], data: list) -> dict[str, HessianAccumulator]:
        """Run the data once with capture modules on the wave's inputs; one Hessian per weight."""
        by_input: dict[fx.Node, HessianAccumulator] = {}
        owners: dict[str, list[HessianAccumulator]] = {}
        for name, sites in wave.items():
            in_features = sites[0].spec.in_features
            for site in sites:
                acc = by_input.get(site.input)
                if acc is None:
                    # float32 sums: float64 made the 1536-wide MLP inputs of MiniLM 10x slower
                    acc = HessianAccumulator(in_features, dtype=torch.float32, name=name)
                    by_input[site.input] = acc
                owners.setdefault(name, []).append(acc)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        inputs = sorted(by_input, key=order.__getitem__)
        container = ensure_container(gm, CAPTURE_ROOT)
        capture_nodes = []
        for i, x in enumerate(inputs):
            container.add_module(str(i), _Capture(by_input[x], stop=(i == len(inputs) - 1)))
            with gm.graph.inserting_after(x):
                capture_nodes.append(gm.graph.call_module(f"{CAPTURE_ROOT}.{i}", (x,)))
        gm.recompile()
        try:
            with torch.no_grad():
                for batch in data:
                    try:
                        batch_feed.call(gm, batch)
                    except _StopForward:
                        pass
        finally:
            for node in capture_nodes:
                gm.graph.erase_node(node)
            gm._modules.pop(CAPTURE_ROOT, None)
            gm.recompile()
        _sync(list(by_input.values()))
        result = {}
        for name, accs in owners.items():
            total = HessianAccumulator(accs[0].in_features, dtype=torch.float32, name=name)
            for acc in dict.fromkeys(accs):  # a shared input counts once per use
                total.merge(acc)
            result[name] = total
        return result

    def _quantize(self, gm: fx.GraphModule, sites: list[LinearSite], acc: HessianAccumulator) -> None:
        rule = sites[0].rule
        name = sites[0].spec.weight_name
        weight = sites[0].param_value().detach()
        result = gptq_quantize(
            weight,
            acc.hessian(),
            rule.weight_qtype,
            axis=weight_axis(sites[0]),
            block_size=rule.group_size,
            method="minmax" if rule.weight_symmetric is False else "absmax",
            symmetric=rule.weight_symmetric,
            scale_dtype=default_scale_dtype(rule.weight_qtype, False),
            percdamp=self.percdamp,
            name=name,
        )
        install_encoding(gm, sites, result.encoding, self.storage, codes=result.codes, method=self.method)


def dependency_waves(gm: fx.GraphModule, groups: dict[str, list[LinearSite]]) -> list[list[str]]:
    """Weights in waves: a weight joins the first wave after every weight its inputs depend on.

    Dependencies are tracked with one bit per weight group propagated through the graph, so the
    cost is one walk over the nodes.
    """
    bit = {name: 1 << i for i, name in enumerate(groups)}
    site_group = {s.node: name for name, sites in groups.items() for s in sites}
    masks: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        m = 0
        for inp in node.all_input_nodes:
            m |= masks.get(inp, 0)
        if node in site_group:
            m |= bit[site_group[node]]
        masks[node] = m
    depends = {
        name: _or(masks.get(s.input, 0) for s in sites) & ~bit[name] for name, sites in groups.items()
    }
    waves: list[list[str]] = []
    done = 0
    remaining = list(groups)
    while remaining:
        wave = [n for n in remaining if depends[n] & ~done == 0]
        if not wave:  # a cycle cannot happen in a DAG; guard anyway
            raise QuantizationError("GPTQ could not order the weights by their dependencies")
        waves.append(wave)
        for n in wave:
            done |= bit[n]
        remaining = [n for n in remaining if n not in wave]
    return waves


def _or(values) -> int:
    out = 0
    for v in values:
        out |= v
    return out


def _sync(accumulators: list[HessianAccumulator]) -> None:
    if is_initialized():
        sync_stats(accumulators)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="GPTQ waves", leave=False)
