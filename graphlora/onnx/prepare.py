"""FX-level preparation of a graph for export, one function per ``lora=`` mode.

Everything here works on a storage-sharing copy of the model's GraphModule (the user's model is
never changed) and leaves a graph whose every quantized weight is a ``graphlora::dequantize*``
node over buffers — the one form :mod:`graphlora.onnx.lowering` knows — so the modes differ only
in what happens to the LoRA branches:

``merged``   the branch is folded into the base weight, ``W' = W + scale * B @ A`` computed from
             the weights the branch actually uses (fake-quantized LoRA weights included), and
             ``W'`` is quantized like the base was. Encodings: a base that carries a
             ``weight_encoding`` (QW-LoRA: float weights kept on the quantization grid) is
             quantized with exactly that encoding (reused, the LoRA was trained for that grid);
             a base stored quantized (QLoRA) gets a *re-computed* encoding of the same qtype,
             granularity, symmetry and scale dtype, with the site rule's calibration method
             (absmax/minmax/mse; a GPTQ rule falls back to absmax/minmax by symmetry), so the
             merged delta is never clipped by ranges calibrated without it.
``branch``   the base stays quantized, the branch stays as its own small MatMuls (with its own
             fake-quant encodings, lowered like the base's).
``inputs``   as ``branch``, but each branch reads two named weights laid out for MatMul —
             ``<site>.lora_A`` = ``A^T`` of shape ``(in, r)`` and ``<site>.lora_B`` =
             ``(scale * B)^T`` of shape ``(r, out)`` — which the export turns into graph inputs
             with the current adapter as their initial value (see :mod:`graphlora.onnx.adapters`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx, nn

from graphlora import meta
from graphlora.errors import ExportError
from graphlora.graph_utils import (
    delete_tensor,
    evaluate,
    get_tensor,
    remove_dead_nodes,
    set_tensor,
)
from graphlora.model import share_storage_copy
from graphlora.quant import Encoding, calibrate_weight
from graphlora.sites import LinearSite, tagged_sites
from graphlora.training_mode import set_training_flags

LoraMode = Literal["merged", "branch", "inputs"]
LORA_MODES = ("merged", "branch", "inputs")
EXPORT_ROOT = "graphlora_export"
LORA_INPUT_ROOT = "graphlora_lora_inputs"

aten = torch.ops.aten


@dataclass(frozen=True)
class LoraInput:
    """One LoRA weight exported as a graph input (``lora="inputs"``)."""

    name: str  # ONNX input name, e.g. "encoder.layer.0.attention.self.query.lora_A"
    buffer: str  # the buffer name in the prepared GraphModule (the initializer torch.onnx writes)
    module_path: str
    which: str  # "lora_A" | "lora_B"
    rank_axis: int  # which axis is the LoRA rank (1 for lora_A, 0 for lora_B)


@dataclass
class PreparedGraph:
    graph_module: fx.GraphModule
    lora: str
    lora_inputs: list[LoraInput] = field(default_factory=list)
    adapter: str | None = None


@dataclass
class Branch:
    """The nodes of one LoRA branch, found by walking back from its ``lora_add``."""

    add: fx.Node
    module_path: str
    adapter: str
    a: fx.Node | None = None
    b: fx.Node | None = None
    scale: fx.Node | None = None
    nodes: list[fx.Node] = field(default_factory=list)

    @property
    def fake_quants(self) -> list[fx.Node]:
        return [n for n in self.nodes if meta.role(n) in ("fake_quant", "observer")]

    @property
    def scale_value(self) -> float:
        return float(self.scale.args[1]) if self.scale is not None else 1.0

    @property
    def standard(self) -> bool:
        """``linear(x, A)`` then ``linear(h, B)``: the pair read in the parameter's layout."""
        return (self.a is not None and self.b is not None and self.a.target == aten.linear.default
                and self.b.target == aten.linear.default)


def find_branches(gm: fx.GraphModule) -> list[Branch]:
    branches = []
    for add in gm.graph.nodes:
        if meta.role(add) != "lora_add":
            continue
        info = meta.info(add)
        br = Branch(add, info.get("module_path", ""), info.get("adapter", ""))
        stack, seen = [add.args[1]], set()
        while stack:
            n = stack.pop()
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            ni = meta.info(n)
            if ni.get("adapter") != br.adapter or ni.get("module_path") != br.module_path:
                continue
            if n.op == "call_function":
                br.nodes.append(n)
                r = ni.get("role")
                if r == "lora_a":
                    br.a = n
                elif r == "lora_b":
                    br.b = n
                elif r == "lora_scale":
                    br.scale = n
            stack.extend(n.all_input_nodes)
        branches.append(br)
    return branches


# ------------------------------------------------------------------------------------ entry
def prepare(gm: fx.GraphModule, lora: str) -> PreparedGraph:
    """A storage-sharing, eval-mode copy of ``gm`` prepared for ``lora`` mode."""
    if lora not in LORA_MODES:
        raise ExportError(f"unknown lora mode {lora!r}; use one of {', '.join(LORA_MODES)}")
    gm = share_storage_copy(gm)
    set_training_flags(gm, False)
    _check_no_observers(gm)
    if lora == "merged":
        prepared = PreparedGraph(gm, lora)
        _merge(gm)
    else:
        _materialise_weight_encodings(gm)
        prepared = PreparedGraph(gm, lora)
        if lora == "inputs":
            prepared.lora_inputs, prepared.adapter = _lora_as_inputs(gm)
    remove_dead_nodes(gm)
    gm.graph.lint()
    gm.recompile()
    return prepared


def _check_no_observers(gm: fx.GraphModule) -> None:
    observers = [n for n in gm.graph.nodes if meta.role(n) == "observer"]
    if observers:
        where = meta.info(observers[0]).get("module_path") or observers[0].name
        raise ExportError(
            f"the model still has {len(observers)} activation observer(s) (first at {where!r}): "
            "run graphlora.calibrate(model, batches) before export so they become fake-quant nodes"
        )


# ------------------------------------------------------------------------------ quantized base
def _dequant_node(site: LinearSite) -> fx.Node | None:
    """The ``dequant`` node feeding a site's weight (through a transpose), if any."""
    node = site.weight_input
    for _ in range(3):
        if meta.role(node) == "dequant":
            return node
        if node.op != "call_function" or not node.all_input_nodes:
            return None
        node = node.all_input_nodes[0]
    return None


def install_quantized(gm: fx.GraphModule, sites: list[LinearSite], encoding: Encoding,
                      weight: torch.Tensor) -> fx.Node:
    """Store ``weight`` quantized with ``encoding`` and make ``sites`` read it through one
    ``graphlora::dequantize*`` node (the graph form the lowering knows)."""
    spec = sites[0].spec
    name = spec.weight_name
    dtype = getattr(torch, spec.weight_dtype)
    storage = encoding.pack(encoding.quantize(weight.detach().to(torch.float32)))
    op, args = encoding.storage_op(storage, dtype)
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min((s.node for s in sites), key=order.__getitem__)
    node_args = []
    with graph.inserting_before(first):
        for arg_schema, value in zip(op._schema.arguments, args):
            if isinstance(value, torch.Tensor):
                qual = f"{EXPORT_ROOT}.{name}.{arg_schema.name}"
                set_tensor(gm, qual, value.detach().clone(), parameter=False)
                read = graph.get_attr(qual)
                meta.tag(read, "weight", module_path=spec.module_path, tensor=name)
                node_args.append(read)
            else:
                node_args.append(value)
        node = graph.call_function(op, tuple(node_args))
    meta.tag(node, "dequant", module_path=spec.module_path, tensor=name, qtype=encoding.qtype.name,
             block_size=encoding.block_size, axis=encoding.axis, encoding=encoding)
    for site in sites:
        site.feed_param(node)
    return node


def _groups(gm: fx.GraphModule) -> dict[str, list[LinearSite]]:
    groups: dict[str, list[LinearSite]] = {}
    for site in tagged_sites(gm):
        groups.setdefault(site.spec.weight_name, []).append(site)
    return groups


def _materialise_weight_encodings(gm: fx.GraphModule) -> None:
    """Sites whose float weight sits on a quantization grid (``weight_encoding``) get stored
    quantized with exactly that encoding (codes recovered exactly: the weight is on the grid)."""
    for sites in _groups(gm).values():
        enc = meta.info(sites[0].node).get("weight_encoding")
        if enc is None or _dequant_node(sites[0]) is not None:
            continue
        weight = sites[0].param_value().detach().float()
        install_quantized(gm, sites, enc, weight)
        _mark_stored(sites, enc)
        remove_dead_nodes(gm)


def _mark_stored(sites: list[LinearSite], enc: Encoding) -> None:
    for site in sites:
        meta.drop(site.node, "weight_encoding")
        meta.tag(site.node, "base", weight_qtype=enc.qtype.name)


# ------------------------------------------------------------------------------------ merged
def _effective(gm: fx.GraphModule, node: fx.Node, index: int) -> torch.Tensor:
    return evaluate(gm, node.args[index]).detach().float()


def _branch_delta(gm: fx.GraphModule, br: Branch, site: LinearSite) -> torch.Tensor:
    """``scale * B @ A`` in the parameter's stored layout, from the weights the branch uses.

    The pair has PEFT's shapes in the parameter's orientation (``A (r, in)``, ``B (out, r)``)
    whichever way a use reads it, so the delta is ``(out, in)``, transposed for ``(in, out)``
    (Conv1D) parameters — as in :mod:`graphlora.passes.merge_lora`.
    """
    if br.a is None or br.b is None:
        raise ExportError(f"LoRA branch at {br.module_path!r} ({br.adapter}) is incomplete")
    a = _effective(gm, br.a, 1)
    b = _effective(gm, br.b, 1)
    delta = (b @ a) * br.scale_value
    return delta if site.spec.param_layout == "out_in" else delta.t()


def _recomputed(enc: Encoding, weight: torch.Tensor, method: str | None) -> Encoding:
    """A fresh encoding for ``weight`` shaped like ``enc`` (qtype, granularity, symmetry,
    scale dtype, double quantization). ``method`` is how the base was calibrated; GPTQ (which
    needs data) and methods that contradict the encoding's symmetry fall back to absmax
    (symmetric) or minmax (asymmetric)."""
    if method not in ("absmax", "minmax", "mse") or (method == "absmax") != enc.symmetric and method != "mse":
        method = "absmax" if enc.symmetric else "minmax"
    if enc.qtype.kind != "int":
        method = "absmax"
    return calibrate_weight(
        weight, enc.qtype, method=method, axis=enc.axis, block_size=enc.block_size,
        symmetric=enc.symmetric, scale_dtype=enc.scale.dtype,
        double_quant=enc.double_quant is not None, name=enc.name,
    )


def _merge(gm: fx.GraphModule) -> None:
    sites = tagged_sites(gm)
    deltas: dict[str, torch.Tensor] = {}
    counted: set[tuple[str, str]] = set()
    branches = find_branches(gm)
    for br in branches:
        site = _site_of_branch(br, sites)
        if (br.module_path, br.adapter) in counted:  # a weight used twice carries its pair twice
            continue
        counted.add((br.module_path, br.adapter))
        name = site.spec.weight_name
        delta = _branch_delta(gm, br, site)
        deltas[name] = deltas[name] + delta if name in deltas else delta
    for br in branches:  # take the branches out, with everything that belongs to them
        br.add.replace_all_uses_with(br.add.args[0])
    for node in reversed(list(gm.graph.nodes)):
        if meta.info(node).get("adapter") is not None and not node.users:
            gm.graph.erase_node(node)
    for name, group in _groups(gm).items():
        if name not in deltas:
            continue
        paths = sorted({s.module_path for s in group})
        if len(paths) > 1:  # one tensor, one merged value: it cannot hold two paths' deltas
            raise ExportError(
                f"lora='merged' cannot fold LoRA into {name!r}: the weight is tied across module "
                f"paths {', '.join(paths)}, which would need different merged weights; export with "
                "lora='branch'"
            )
        weight = group[0].param_value().detach().float() + deltas[name]
        on_grid = meta.info(group[0].node).get("weight_encoding")
        dq = _dequant_node(group[0])
        if dq is not None:
            enc = meta.info(dq).get("encoding")
            if enc is None:
                raise ExportError(f"quantized weight {name!r} has no encoding in its dequant node "
                                  "metadata; cannot re-quantize the merged weight")
            method = meta.info(dq).get("method") or getattr(group[0].rule, "weight_calibration", None)
            install_quantized(gm, group, _recomputed(enc, weight, method), weight)
        elif on_grid is not None:
            install_quantized(gm, group, on_grid, weight)
            _mark_stored(group, on_grid)
        else:
            _replace_float(gm, group, weight)
        remove_dead_nodes(gm)
    _materialise_weight_encodings(gm)  # grid weights without LoRA
    remove_dead_nodes(gm)
    _drop_unread(gm)


def _site_of_branch(br: Branch, sites: list[LinearSite]) -> LinearSite:
    base = br.add.args[0]
    for site in sites:
        if site.node is base:
            return site
    for site in sites:
        if site.module_path == br.module_path:
            return site
    raise ExportError(f"LoRA branch at {br.module_path!r} does not belong to a recognised site")


def _replace_float(gm: fx.GraphModule, sites: list[LinearSite], weight: torch.Tensor) -> None:
    """Sites compute with the float ``weight``; it takes the parameter's own name when nothing
    else reads the original (a tied weight keeps serving its other readers)."""
    spec = sites[0].spec
    original = spec.weight_name
    temp = f"{EXPORT_ROOT}.{original}"
    value = weight.to(getattr(torch, spec.weight_dtype))
    set_tensor(gm, temp, nn.Parameter(value, requires_grad=False), parameter=True)
    graph = gm.graph
    for site in sites:
        with graph.inserting_before(site.node):
            read = graph.get_attr(temp)
        site.feed_param(read)
    remove_dead_nodes(gm)
    if any(n.op == "get_attr" and n.target == original for n in graph.nodes):
        return
    set_tensor(gm, original, get_tensor(gm, temp), parameter=True)
    delete_tensor(gm, temp)
    for node in graph.nodes:
        if node.op == "get_attr" and node.target == temp:
            node.target = original


def _drop_unread(gm: fx.GraphModule) -> None:
    """Tensors nothing reads any more are not exported."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name.startswith("graphlora_") and name not in read:
            delete_tensor(gm, name)


# ------------------------------------------------------------------------------------ inputs
def _lora_as_inputs(gm: fx.GraphModule) -> tuple[list[LoraInput], str | None]:
    branches = find_branches(gm)
    adapters = sorted({br.adapter for br in branches})
    if len(adapters) > 1:
        raise ExportError(
            f"lora='inputs' exports one adapter's branches, but adapters {adapters} are active; "
            "call model.set_adapter(name) first (other adapters are written with write_adapter)"
        )
    inputs: list[LoraInput] = []
    made: dict[str, tuple[str, str]] = {}
    for br in branches:
        if br.fake_quants:
            raise ExportError(
                f"lora='inputs' cannot export the quantized LoRA branch at {br.module_path!r}: its "
                "encodings belong to one adapter and would be wrong for the next; use "
                "lora='branch' (or 'merged'), or export without LoRA quantization"
            )
        if not br.standard:
            raise ExportError(
                f"lora='inputs': the LoRA branch at {br.module_path!r} reads its weight transposed "
                "(a parameter used in both orientations); use lora='branch'"
            )
        path = br.module_path
        if path not in made:
            a = evaluate(gm, br.a.args[1]).detach()
            b = evaluate(gm, br.b.args[1]).detach()
            a_name = f"{LORA_INPUT_ROOT}.{path}.lora_A" if path else f"{LORA_INPUT_ROOT}.lora_A"
            b_name = f"{LORA_INPUT_ROOT}.{path}.lora_B" if path else f"{LORA_INPUT_ROOT}.lora_B"
            set_tensor(gm, a_name, a.t().contiguous(), parameter=False)
            set_tensor(gm, b_name, (b * br.scale_value).t().contiguous(), parameter=False)
            made[path] = (a_name, b_name)
            inputs.append(LoraInput(adapter_input_name(path, "lora_A"), a_name, path, "lora_A", 1))
            inputs.append(LoraInput(adapter_input_name(path, "lora_B"), b_name, path, "lora_B", 0))
        a_name, b_name = made[path]
        graph = gm.graph
        with graph.inserting_before(br.a):
            a_read = graph.get_attr(a_name)
        br.a.target = aten.matmul.default
        br.a.args = (br.a.args[0], a_read)
        if br.scale is not None:
            br.scale.replace_all_uses_with(br.scale.args[0])
        with graph.inserting_before(br.b):
            b_read = graph.get_attr(b_name)
        br.b.target = aten.matmul.default
        br.b.args = (br.b.args[0], b_read)
        for n in (a_read, b_read):
            meta.tag(n, "weight", module_path=path, adapter=br.adapter)
    return inputs, (adapters[0] if adapters else None)


def adapter_input_name(module_path: str, which: str) -> str:
    """ONNX input name of a LoRA weight in ``lora="inputs"`` exports."""
    return f"{module_path}.{which}" if module_path else which


def adapter_arrays(lora_model, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one adapter under the input names and layouts of ``lora="inputs"``:
    ``<site>.lora_A`` = ``A^T`` ``(in, r)``, ``<site>.lora_B`` = ``(scale * B)^T`` ``(r, out)``."""
    from graphlora.adapters import lora_param_name

    name = lora_model._resolve_adapter(adapter)
    specs = lora_model.adapters[name]
    gm = lora_model.graph_module
    out: dict[str, torch.Tensor] = {}
    for path, spec in specs.items():
        a = get_tensor(gm, lora_param_name(name, path, "lora_A")).detach().float()
        b = get_tensor(gm, lora_param_name(name, path, "lora_B")).detach().float()
        out[adapter_input_name(path, "lora_A")] = a.t().contiguous()
        out[adapter_input_name(path, "lora_B")] = (b * spec.scale).t().contiguous()
    return out


__all__ = ["LORA_MODES", "LoraInput", "PreparedGraph", "adapter_arrays", "adapter_input_name",
           "install_quantized", "prepare"]
