"""What every export preparation pass shares, and the sweep that ends each preparation.

Export passes run on a storage-sharing, eval-mode copy of a model's graph (see
:mod:`graphlora.onnx.prepare`), one :class:`~graphlora.passes.base.PassPipeline` per export, so
each step is linted, timed and — for models transformed with ``record=True`` — diffable. They
all require a calibrated graph: an observer is a calibration-time module with no ONNX form, and
a graph that still has one was exported before :func:`graphlora.calibrate` finished.
"""

from __future__ import annotations

import torch.fx as fx

from graphlora import meta
from graphlora.errors import ExportError
from graphlora.graph_utils import remove_dead_nodes
from graphlora.passes.base import GraphPass, PassResult
from graphlora.passes.observers import observer_nodes
from graphlora.passes.weights import drop_unread_tensors


class ExportPass(GraphPass):
    """Base of the export preparation passes: requires a graph without observers."""

    def requires(self, gm: fx.GraphModule) -> None:
        observers = observer_nodes(gm)
        if observers:
            where = meta.info(observers[0]).get("module_path") or observers[0].name
            raise ExportError(
                f"the model still has {len(observers)} activation observer(s) (first at {where!r}): "
                "run graphlora.calibrate(model, batches) before export so they become fake-quant nodes"
            )


class PruneUnusedPass(ExportPass):
    """Nodes whose results nobody uses, and graphlora tensors no node reads, are not exported."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        removed = remove_dead_nodes(gm)
        dropped = drop_unread_tensors(gm)
        return PassResult(gm, bool(removed or dropped))
