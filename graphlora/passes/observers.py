"""Activation quantization: observers in, calibration data through, fake-quant out.

Observers exist only while :func:`graphlora.calibrate` runs: :class:`InsertObserversPass` puts one
on every tensor a rule wants quantized, the data flows through, and :class:`FreezeObserversPass`
replaces each observer by a ``graphlora::fake_quantize`` node with the computed encoding (scale and
zero point in buffers under ``graphlora_quant.act``). Training never feeds observers by accident,
and the graph after calibration is exactly the simulated quantized model that is exported.

Tensors and their names (the keys of :meth:`LoraModel.encodings`):

* ``<site>.input`` — a site's input, for rules with ``act_qtype`` (one observer per distinct
  input tensor and settings: query, key and value of one block share theirs);
* ``<site>.lora_input`` — the LoRA branch's input when the base input is not quantized but the
  rule has ``lora_act_qtype`` (otherwise the branch reads the quantized base input);
* ``<site>.lora_A.output`` — the rank-r activation between A and B (``lora_act_qtype``);
* ``<site>.lora_A.weight`` / ``<site>.lora_B.weight`` — LoRA weights (``lora_weight_qtype``,
  symmetric per output channel), quantized from their values at calibration time.

``<site>`` is the module path (``path#1`` for a module's second use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

from graphlora import meta
from graphlora.branches import LoraBranch, branches_by_site
from graphlora.errors import PassError
from graphlora.graph_utils import (
    delete_tensor,
    ensure_container,
    erase_unused_chain,
    fake_mode,
    get_tensor,
    insert_call,
    insert_get_attr,
    set_tensor,
)
from graphlora.passes.base import GraphPass, PassResult
from graphlora.quant import Encoding, calibrate_weight, make_observer
from graphlora.quant.ops import OPS
from graphlora.sites import tagged_sites

Targets = Literal["all", "base", "lora"]
OBSERVER_ROOT = "graphlora_observers"
ACT_ROOT = "graphlora_quant.act"
LORA_WEIGHT_ROOT = "graphlora_quant.lora"
FAKE_QUANT = OPS["fake_quantize"]


@dataclass(frozen=True)
class _Target:
    tensor: str
    qtype: str
    symmetric: bool
    calibration: str
    percentile: float
    module_path: str
    adapter: str | None
    grid: str | None = None


def _branch_inputs(branches: list[LoraBranch]) -> list[fx.Node]:
    """The nodes of a site's branches that read the site's input (read when asked: observing
    the input rewires them)."""
    return [n for br in branches for n in br.input_consumers()]


def _is_quantized(node: fx.Node) -> bool:
    return meta.role(node) in ("fake_quant", "observer")


@dataclass
class InsertObserversPass(GraphPass):
    """Observe every tensor the rules want quantized and that has no encoding yet."""

    targets: Targets = "all"
    observers: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"InsertObserversPass[{self.targets}]"

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.observers = []
        container = ensure_container(gm, OBSERVER_ROOT)
        shared: dict[tuple, fx.Node] = {}

        def observe(value: fx.Node, consumers: list[fx.Node], target: _Target) -> None:
            consumers = [c for c in consumers if value in c.all_input_nodes]
            if not consumers or _is_quantized(value):
                return
            key = (value, target.qtype, target.symmetric, target.calibration, target.grid)
            obs_node = shared.get(key)
            if obs_node is None:
                index = str(len(container._modules))
                kwargs = {"percentile": target.percentile} if target.calibration == "percentile" else {}
                container.add_module(index, make_observer(target.calibration, target.tensor, **kwargs))
                with gm.graph.inserting_after(value):
                    obs_node = gm.graph.call_module(f"{OBSERVER_ROOT}.{index}", (value,))
                meta.tag(obs_node, "observer", **target.__dict__)
                if "val" in value.meta:
                    obs_node.meta["val"] = value.meta["val"]
                shared[key] = obs_node
                self.observers.append(target.tensor)
            for c in consumers:
                c.replace_input_with(value, obs_node)

        by_site = branches_by_site(gm)
        for site in tagged_sites(gm):
            rule = site.rule
            if rule is None:
                continue
            key = site.spec.key
            branches = by_site.get(key, [])
            base_quantized = False
            if self.targets in ("all", "base") and rule.act_qtype:
                consumers = [site.node]
                if rule.lora_act_qtype:
                    consumers += _branch_inputs(branches)
                observe(site.input, consumers, _Target(
                    f"{key}.input", rule.act_qtype, rule.act_symmetric, rule.act_calibration,
                    rule.act_percentile, site.module_path, None, rule.act_grid))
                base_quantized = True
            if self.targets in ("all", "lora") and rule.lora_act_qtype and branches:
                if not base_quantized and not _is_quantized(site.input):
                    observe(site.input, _branch_inputs(branches), _Target(
                        f"{key}.lora_input", rule.lora_act_qtype, rule.act_symmetric,
                        rule.act_calibration, rule.act_percentile, site.module_path,
                        branches[0].adapter, rule.act_grid))
                for br in branches:
                    if br.scale is None:
                        continue
                    consumers = [u for u in br.scale.users if meta.role(u) in ("lora_a", "lora_b")]
                    which = "lora_A" if any(meta.role(u) == "lora_b" for u in consumers) else "lora_B"
                    observe(br.scale, consumers, _Target(
                        f"{key}.{which}.output", rule.lora_act_qtype, rule.act_symmetric,
                        rule.act_calibration, rule.act_percentile, site.module_path, br.adapter,
                        rule.act_grid))
        if not container._modules:
            gm._modules.pop(OBSERVER_ROOT, None)
        return PassResult(gm, bool(self.observers))


def observer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if meta.role(n) == "observer"]


def observer_modules(gm: fx.GraphModule) -> list[torch.nn.Module]:
    return [gm.get_submodule(n.target) for n in observer_nodes(gm)]


@dataclass
class FreezeObserversPass(GraphPass):
    """Replace each observer by fake-quant with the encoding its statistics give."""

    encodings: dict[str, Encoding] = field(default_factory=dict)

    def call(self, gm: fx.GraphModule) -> PassResult:
        mode = fake_mode(gm)
        self.encodings = {}
        for node in observer_nodes(gm):
            info = dict(meta.info(node))
            observer = gm.get_submodule(node.target)
            encoding = observer.compute_encoding(info["qtype"], info["symmetric"], info.get("grid"))
            fq = _insert_fake_quant(gm, node.args[0], encoding, info, mode, after=node)
            node.replace_all_uses_with(fq)
            gm.graph.erase_node(node)
            self.encodings[info["tensor"]] = encoding
        gm._modules.pop(OBSERVER_ROOT, None)
        return PassResult(gm, bool(self.encodings))

    def ensures(self, gm: fx.GraphModule) -> None:
        left = observer_nodes(gm)
        if left:
            raise PassError(f"{self.name} left {len(left)} observer(s) (first: {left[0].name})")


def _insert_fake_quant(gm, value: fx.Node, encoding: Encoding, info: dict, mode, *, after: fx.Node, root: str = ACT_ROOT, axis=None) -> fx.Node:
    tensor = info["tensor"]
    tags = {k: info.get(k) for k in ("module_path", "adapter")}
    qual = f"{root}.{tensor}"
    set_tensor(gm, f"{qual}.scale", encoding.scale.detach().clone(), parameter=False)
    if encoding.zero_point is not None:
        set_tensor(gm, f"{qual}.zero_point", encoding.zero_point.detach().clone(), parameter=False)
    with gm.graph.inserting_after(after):
        scale = insert_get_attr(gm.graph, f"{qual}.scale", role="weight", mode=mode, tensor=tensor, **tags)
    cursor = scale
    zp = None
    if encoding.zero_point is not None:
        with gm.graph.inserting_after(cursor):
            zp = insert_get_attr(gm.graph, f"{qual}.zero_point", role="weight", mode=mode, tensor=tensor, **tags)
        cursor = zp
    qt = encoding.qtype
    block = encoding.block_size
    with gm.graph.inserting_after(cursor):
        fq = insert_call(
            gm.graph, FAKE_QUANT, (value, scale, zp, axis, block, qt.qmin, qt.qmax),  # the grid's
            role="fake_quant", mode=mode, tensor=tensor, qtype=qt.name, encoding=encoding,
            symmetric=encoding.symmetric, **tags,
        )
    return fq


@dataclass
class QuantizeLoraWeightsPass(GraphPass):
    """Fake-quantize LoRA A/B weights (per output channel) for rules with ``lora_weight_qtype``.

    Encodings are computed from the weights' current values, so run it after training (QW-LoRA
    step 3); the straight-through estimator keeps the weights trainable if training continues.
    """

    encodings: dict[str, Encoding] = field(default_factory=dict)

    def call(self, gm: fx.GraphModule) -> PassResult:
        mode = fake_mode(gm)
        self.encodings = {}
        for site in tagged_sites(gm):
            rule = site.rule
            if rule is None or not rule.lora_weight_qtype:
                continue
            for node in list(gm.graph.nodes):
                info = meta.info(node)
                if not (node.op == "get_attr" and info.get("tensor") in ("lora_A", "lora_B")
                        and info.get("module_path") == site.module_path):
                    continue
                users = [u for u in node.users if meta.role(u) != "fake_quant"]
                if not users or any(meta.role(u) == "fake_quant" for u in node.users):
                    continue
                which = info["tensor"]
                tensor = f"{site.module_path}.{which}.weight"
                weight = get_tensor(gm, node.target).detach()
                encoding = calibrate_weight(weight, rule.lora_weight_qtype, method="absmax", axis=0,
                                            name=tensor, grid=_int_grid(rule.lora_weight_qtype, rule.weight_grid))
                fq = _insert_fake_quant(
                    gm, node, encoding, {**info, "tensor": tensor}, mode, after=node,
                    root=LORA_WEIGHT_ROOT, axis=0,
                )
                for u in users:
                    u.replace_input_with(node, fq)
                self.encodings[tensor] = encoding
        return PassResult(gm, bool(self.encodings))


def _int_grid(qtype: str, grid: str | None) -> str | None:
    """A rule's weight grid for its LoRA weights: the restricted grid only where it exists (a
    rule may pair an nf4 base, which has none, with integer LoRA weights)."""
    from graphlora.quant import get_qtype

    return grid if get_qtype(qtype).kind == "int" else None


def remove_fake_quant(gm: fx.GraphModule, targets: Targets = "all") -> int:
    """Take activation/LoRA fake-quant nodes out again (to recalibrate them)."""
    removed = 0
    for node in [n for n in gm.graph.nodes if meta.role(n) == "fake_quant"]:
        is_lora = meta.info(node).get("adapter") is not None or ".lora_" in meta.info(node).get("tensor", "")
        if targets == "base" and is_lora or targets == "lora" and not is_lora:
            continue
        tensor = meta.info(node)["tensor"]
        node.replace_all_uses_with(node.args[0])
        params = [a for a in node.args[1:3] if isinstance(a, fx.Node)]
        gm.graph.erase_node(node)
        erase_unused_chain(params)
        removed += 1
        for root in (ACT_ROOT, LORA_WEIGHT_ROOT):
            for leaf in ("scale", "zero_point"):
                try:
                    delete_tensor(gm, f"{root}.{tensor}.{leaf}")
                except AttributeError:
                    pass
    return removed
