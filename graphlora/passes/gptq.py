"""GPTQ as a graph pass driven by calibration data (Frantar et al., 2022).

Each weight is quantized from the Hessian ``H = 2 X^T X / n`` of the inputs its site sees, and the
layers run *sequentially*: a weight's Hessian is collected with every weight it depends on
already quantized, so it compensates its predecessors' error too. The schedule is
:mod:`graphlora.passes.sequential`'s: one pass over the depth, block by block (each block's
inputs cached once, its weights quantized in dependency order on its own recomputed
activations, its outputs propagated to the next block), or — for a graph without repeated
blocks — one run of the graph per dependency wave. Sites whose inputs do not depend on each
other (query, key and value of one attention block) share a wave and one pass over the data;
sites that read the same input share one Hessian.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import torch
import torch.fx as fx

from graphlora import meta
from graphlora import batches as batch_feed
from graphlora.collectives import is_initialized, sync_stats
from graphlora.errors import CalibrationError, QuantizationError
from graphlora.passes.base import GraphPass, PassResult
from graphlora.passes.quantize_weights import (
    Storage,
    check_quantized,
    default_scale_dtype,
    install_encoding,
    weight_axis,
)
from graphlora.passes.sequential import Schedule, WeightSolution, calibrate_sequentially
from graphlora.passes.weights import groups_by_weight
from graphlora.quant import HessianAccumulator, gptq_quantize
from graphlora.quant.seqmse import adaround_quantize, seqmse_quantize
from graphlora.sites import LinearSite, tagged_sites

log = logging.getLogger("graphlora.gptq")


#: the Hessian-based methods other than GPTQ this pass runs (graphlora.quant.seqmse)
OUTPUT_ERROR_METHODS = {"seqmse": seqmse_quantize, "adaround": adaround_quantize}


@dataclass
class GPTQPass(GraphPass):
    """Quantize every site whose rule says ``weight_calibration=<method>``, sequentially, from
    the Hessian of its inputs: ``gptq`` (error compensation), ``seqmse`` or ``adaround`` (the
    layer-output error; :mod:`graphlora.quant.seqmse`). Every weight sees the inputs of the
    layers before it already quantized, as GPTQ and AIMET's SeqMSE do.

    ``schedule``: ``"auto"`` (block by block where the graph has blocks, else the wave
    schedule), ``"blocks"`` or ``"waves"``; ``blocks``: the block module paths or a regex
    (default: found in the graph). After the pass, ``schedule_used`` says which schedule ran
    and ``seconds`` what each block took; the ``graphlora.gptq`` logger says it at INFO, and the
    progress bar is named after it ("GPTQ blocks" or "GPTQ waves").
    """

    batches: Iterable[Any]
    storage: Storage = "packed"
    num_batches: int | None = None
    progress: bool = True
    percdamp: float = 0.01
    #: the registered weight-calibration method this pass runs (graphlora.quant.weight_methods)
    method: str = "gptq"
    schedule: Literal["auto", "blocks", "waves"] = "auto"
    blocks: Sequence[str] | str | None = None
    quantized: list[str] = field(default_factory=list)
    schedule_used: Schedule | None = None
    seconds: list[tuple[str, float]] = field(default_factory=list)

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
            raise CalibrationError(f"{self.method.upper()} needs calibration data: pass calibration_data=... (batches)")
        data = list(batch_feed.iterate(self.batches, num_batches=self.num_batches, progress=False))
        if not data:
            raise CalibrationError(f"{self.method.upper()} got no calibration batches")
        for sites in groups.values():
            if any(s.spec.use_layout != s.spec.param_layout for s in sites):
                raise QuantizationError(
                    f"{self.method.upper()} on {sites[0].spec.weight_name!r}: the weight is read in both "
                    "orientations, so its inputs have no single Hessian; use absmax/mse for it"
                )
        result = calibrate_sequentially(
            gm, groups, data, _GPTQ(self.percdamp, self.method), schedule=self.schedule, blocks=self.blocks,
            progress=self.progress, desc=self.method.upper(),
        )
        self.schedule_used, self.seconds = result.schedule, result.seconds
        log.info("%s on %d weights: %s, %.1f s", self.method.upper(), len(result.solutions), result.schedule,
                 sum(s for _, s in result.seconds))
        self.quantized = []
        for name, solution in result.solutions.items():
            install_encoding(gm, groups[name], solution.encoding, self.storage, codes=solution.codes,
                             method=self.method)
            self.quantized.append(name)
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        check_quantized(gm, self.quantized, self.storage, self.name)


class _GPTQ:
    """The Hessian-based methods as a :class:`~graphlora.passes.sequential.SequentialMethod`:
    Hessians of the site inputs, summed across ranks, then :func:`graphlora.quant.gptq_quantize`
    or one of :data:`OUTPUT_ERROR_METHODS`."""

    def __init__(self, percdamp: float, method: str = "gptq"):
        self.percdamp = percdamp
        self.method = method

    def collector(self, name: str, in_features: int) -> HessianAccumulator:
        # float32 sums: float64 made the 1536-wide MLP inputs of MiniLM 10x slower
        return HessianAccumulator(in_features, dtype=torch.float32, name=name)

    def reduce(self, collectors: list[HessianAccumulator]) -> None:
        if is_initialized():
            sync_stats(collectors)

    def solve(self, name: str, sites: list[LinearSite], collected: list[HessianAccumulator]) -> WeightSolution:
        total = HessianAccumulator(collected[0].in_features, dtype=torch.float32, name=name)
        for acc in collected:
            total.merge(acc)
        rule = sites[0].rule
        name = sites[0].spec.weight_name
        weight = sites[0].param_value().detach()
        common = dict(axis=weight_axis(sites[0]), block_size=rule.group_size,
                      symmetric=rule.weight_symmetric,
                      scale_dtype=default_scale_dtype(rule.weight_qtype, False), name=name,
                      grid=rule.weight_grid)
        if self.method == "gptq":
            result = gptq_quantize(weight, total.hessian(), rule.weight_qtype,
                                   method="minmax" if rule.weight_symmetric is False else "absmax",
                                   percdamp=self.percdamp, **common)
        elif self.method in OUTPUT_ERROR_METHODS:
            result = OUTPUT_ERROR_METHODS[self.method](weight, total.hessian(), rule.weight_qtype, **common)
        else:
            raise QuantizationError(f"{name}: no Hessian-based weight method {self.method!r} "
                                    f"(known: gptq, {', '.join(OUTPUT_ERROR_METHODS)})")
        return WeightSolution(result.encoding, result.codes)
