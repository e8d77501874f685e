"""The FX half of an export: the graph passes of one ``lora=`` mode, on an eval copy.

Everything runs on a storage-sharing copy of the model's GraphModule (the user's model is never
changed) through one :class:`~graphlora.passes.base.PassPipeline`, so every step is linted, timed
and recorded like :func:`graphlora.transform`'s passes (with before/after text, diffable with
:func:`graphlora.diff`, when the model was transformed with ``record=True``). The result is a
graph whose every quantized weight is a ``graphlora::dequantize*`` node over buffers — the one
form :mod:`graphlora.onnx.lowering` knows — and the modes differ only in what happens to the
LoRA branches:

``merged``   :class:`~graphlora.passes.export_merge.MergeLoraForExportPass` folds each branch into
             its base weight and stores it like the base was (re-quantized / on its grid / float);
``branch``   the base stays quantized, the branch stays as its own small MatMuls (with its own
             fake-quant encodings, lowered like the base's);
``inputs``   as ``branch``, but :class:`~graphlora.passes.export_lora_inputs.LoraAsInputsPass`
             makes each branch read two named weights that the export turns into graph inputs
             (see :mod:`graphlora.onnx.adapters`).

Every mode stores QW-LoRA grid weights packed
(:class:`~graphlora.passes.export_grid.StoreGridWeightsPass`) and ends with
:class:`~graphlora.passes.export_base.PruneUnusedPass`; every pass requires a calibrated graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import fx

from graphlora.errors import ExportError
from graphlora.graph_utils import share_storage_copy
from graphlora.passes.base import GraphPass, PassPipeline, PassRecord
from graphlora.passes.export_base import PruneUnusedPass
from graphlora.passes.export_grouped_mm import GroupedMatmulAsGatherPass
from graphlora.passes.export_grid import StoreGridWeightsPass
from graphlora.passes.export_lora_inputs import LoraAsInputsPass, LoraInput
from graphlora.passes.export_merge import MergeLoraForExportPass
from graphlora.sites import is_grouped_mm
from graphlora.training_mode import set_training_flags

LoraMode = Literal["merged", "branch", "inputs"]
LORA_MODES = ("merged", "branch", "inputs")


@dataclass
class PreparedGraph:
    graph_module: fx.GraphModule
    lora: str
    lora_inputs: list[LoraInput] = field(default_factory=list)
    adapter: str | None = None
    pass_log: list[PassRecord] = field(default_factory=list)


def check_lora_mode(lora: str) -> None:
    if lora not in LORA_MODES:
        raise ExportError(f"unknown lora mode {lora!r}; use one of {', '.join(LORA_MODES)}")


def export_passes(lora: str, lora_ranks: dict[str, int] | None = None, *, grouped_mm: bool = False
                  ) -> list[GraphPass]:
    """The preparation passes of one ``lora=`` mode, in order (``lora_ranks``: the exported rank
    of each site in ``inputs`` mode; ``grouped_mm``: the graph has grouped expert GEMMs, which
    become ops ONNX has)."""
    check_lora_mode(lora)
    passes: list[GraphPass] = []
    if lora == "merged":  # before the grid weights are stored: a merged one keeps its grid
        passes.append(MergeLoraForExportPass())
    passes.append(StoreGridWeightsPass())
    if lora == "inputs":
        passes.append(LoraAsInputsPass(ranks=dict(lora_ranks or {})))
    if grouped_mm:
        passes.append(GroupedMatmulAsGatherPass())
    passes.append(PruneUnusedPass())
    return passes


def prepare(gm: fx.GraphModule, lora: str, *, record: bool = False,
            lora_ranks: dict[str, int] | None = None) -> PreparedGraph:
    """A storage-sharing, eval-mode copy of ``gm`` prepared for ``lora`` mode (the passes'
    records in ``pass_log``, with graph texts when ``record``)."""
    passes = export_passes(lora, lora_ranks, grouped_mm=any(is_grouped_mm(n) for n in gm.graph.nodes))
    gm = share_storage_copy(gm)
    set_training_flags(gm, False)
    pipeline = PassPipeline(passes, record=record)
    gm = pipeline(gm)
    prepared = PreparedGraph(gm, lora, pass_log=pipeline.log)
    for p in passes:
        if isinstance(p, LoraAsInputsPass):
            prepared.lora_inputs, prepared.adapter = p.lora_inputs, p.adapter
    return prepared


__all__ = ["LORA_MODES", "LoraMode", "PreparedGraph", "check_lora_mode", "export_passes", "prepare"]
