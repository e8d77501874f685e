"""Whole-graph activation quantization: observers on the outputs of every op of chosen kinds.

Site rules quantize a linear layer's *input*; a fully integer deployment (an NPU, or AIMET's
default placement) needs every activation on an integer grid — LayerNorm, GELU, softmax, the
residual adds, attention products, embeddings. :class:`InsertGraphObserversPass` puts an observer
on the output of each op :func:`graphlora.op_kinds.graph_ops` finds whose first matching
:class:`~graphlora.rules.ActivationRule` has a qtype; :class:`~graphlora.passes.observers.
FreezeObserversPass` then turns each into fake-quant with its encoding, exactly as for site
inputs, and export lowers it to QuantizeLinear/DequantizeLinear. Tensors are named as
:mod:`graphlora.op_kinds` says (``<module>.output``, ``<module>.add``...); an op whose output
already has an observer or fake-quant is left alone, so calibrating again adds nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from graphlora import meta
from graphlora.errors import RuleError
from graphlora.graph_utils import ensure_container
from graphlora.op_kinds import graph_ops
from graphlora.passes.base import GraphPass, PassResult
from graphlora.passes.observers import OBSERVER_ROOT
from graphlora.patterns import PatternSet
from graphlora.quant import make_observer
from graphlora.rules import ActivationRule


def _quantized(node: fx.Node) -> bool:
    return any(meta.role(u) in ("observer", "fake_quant") for u in node.users)


@dataclass
class InsertGraphObserversPass(GraphPass):
    """Observe the output of every op an activation rule matches (first match wins)."""

    rules: list[ActivationRule]
    observers: list[str] = field(default_factory=list)

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.observers = []
        container = ensure_container(gm, OBSERVER_ROOT)
        patterns = PatternSet("activation rules", error=RuleError)
        for op in graph_ops(gm):
            rule = next((r for r in self.rules
                         if r.matches(op.module_path, op.kind, op.tensor, patterns)), None)
            if rule is None or rule.qtype is None or _quantized(op.node):
                continue
            users = [u for u in op.node.users if meta.role(u) not in ("observer", "fake_quant")]
            if not users:
                continue
            index = str(len(container._modules))
            kwargs = {"percentile": rule.percentile} if rule.calibration == "percentile" else {}
            container.add_module(index, make_observer(rule.calibration, op.tensor, **kwargs))
            with gm.graph.inserting_after(op.node):
                obs = gm.graph.call_module(f"{OBSERVER_ROOT}.{index}", (op.node,))
            meta.tag(obs, "observer", tensor=op.tensor, qtype=rule.qtype, symmetric=rule.symmetric,
                     calibration=rule.calibration, percentile=rule.percentile,
                     module_path=op.module_path, grid=rule.grid)
            if "val" in op.node.meta:
                obs.meta["val"] = op.node.meta["val"]
            for u in users:
                u.replace_input_with(op.node, obs)
            self.observers.append(op.tensor)
        if not container._modules:
            gm._modules.pop(OBSERVER_ROOT, None)
        return PassResult(gm, bool(self.observers))
