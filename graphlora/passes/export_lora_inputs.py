"""``lora="inputs"`` export: each branch reads two named weights laid out for MatMul.

``<site>.lora_A`` = ``A^T`` of shape ``(in, r)`` and ``<site>.lora_B`` = ``(scale * B)^T`` of
shape ``(r, out)``: the scale is folded in, so an adapter is self-contained and ranks may differ
between adapters. Each pair is stored at the site's *exported rank* (``ranks``; by default the
adapter's own), its extra A columns and B rows zero: ``x @ A^T @ B^T`` is unchanged by zero
padding, so one graph serves every adapter whose rank at that site is at most the exported one. The weights are stored under ``graphlora_lora_inputs.<site>``; the ONNX export
turns them into graph inputs initialised with the current adapter, and adapter files hold the
same tensors under the same names (:mod:`graphlora.onnx.adapters`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from graphlora import meta
from graphlora.branches import find_branches
from graphlora.errors import ExportError, PassError
from graphlora.graph_utils import erase_unused_chain, set_tensor
from graphlora.passes.base import PassResult
from graphlora.passes.export_base import ExportPass

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
    shape: tuple[int, int] = (0, 0)  # the exported shape: (in, rank) or (rank, out)


def adapter_input_name(module_path: str, which: str) -> str:
    """ONNX input name of a LoRA weight in ``lora="inputs"`` exports."""
    return f"{module_path}.{which}" if module_path else which


def input_layout(a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair in the input layout: ``(A^T, (scale * B)^T)``, contiguous."""
    return a.t().contiguous(), (b * scale).t().contiguous()


@dataclass
class LoraAsInputsPass(ExportPass):
    """Every branch of the (single) active adapter reads its pair from named buffers, in the
    input layout, through two MatMuls; afterwards :attr:`lora_inputs` describes the buffers."""

    lora_inputs: list[LoraInput] = field(default_factory=list)
    adapter: str | None = None
    ranks: dict[str, int] = field(default_factory=dict)  # module path ("*": any) -> exported rank

    def call(self, gm: fx.GraphModule) -> PassResult:
        branches = find_branches(gm)
        adapters = sorted({br.adapter for br in branches})
        if len(adapters) > 1:
            raise ExportError(
                f"lora='inputs' exports one adapter's branches, but adapters {adapters} are active; "
                "call model.set_adapter(name) first (other adapters are written with write_adapter)"
            )
        self.lora_inputs = []
        self.adapter = adapters[0] if adapters else None
        made: dict[str, tuple[str, str]] = {}  # module path -> buffers (a module used twice: once)
        for br in branches:
            if br.dora:
                raise ExportError(
                    f"lora='inputs' cannot export the DoRA branch at {br.module_path!r}: its magnitude "
                    "and weight norm are not a pair of input matrices; use lora='branch' or 'merged'"
                )
            if br.quantizers:
                raise ExportError(
                    f"lora='inputs' cannot export the quantized LoRA branch at {br.module_path!r}: its "
                    "encodings belong to one adapter and would be wrong for the next; use "
                    "lora='branch' (or 'merged'), or export without LoRA quantization"
                )
            if br.site.spec.site_kind != "linear":
                raise ExportError(
                    f"lora='inputs' feeds linear sites' factors; {br.module_path!r} is a site of kind "
                    f"{br.site.spec.site_kind!r}: use lora='branch' (or 'merged')")
            if not br.standard:
                raise ExportError(
                    f"lora='inputs': the LoRA branch at {br.module_path!r} reads its weight transposed "
                    "(a parameter used in both orientations); use lora='branch'"
                )
            path = br.module_path
            if path not in made:
                made[path] = self._store(gm, path, br.a_value(), br.b_value(), br.scale_value)
            a_name, b_name = made[path]
            old = [br.a.args[1], br.b.args[1]]
            graph = gm.graph
            with graph.inserting_before(br.a):
                a_read = graph.get_attr(a_name)
            br.a.target = aten.matmul.default
            br.a.args = (br.a.args[0], a_read)
            if br.scale is not None:
                br.scale.replace_all_uses_with(br.scale.args[0])
                old.append(br.scale)
            with graph.inserting_before(br.b):
                b_read = graph.get_attr(b_name)
            br.b.target = aten.matmul.default
            br.b.args = (br.b.args[0], b_read)
            for n in (a_read, b_read):
                meta.tag(n, "weight", module_path=path, adapter=br.adapter)
            erase_unused_chain(old)
        return PassResult(gm, bool(branches))

    def _store(self, gm: fx.GraphModule, path: str, a: torch.Tensor, b: torch.Tensor,
               scale: float) -> tuple[str, str]:
        names = []
        rank = a.shape[0]
        target = int(self.ranks.get(path, self.ranks.get("*", rank)))
        if target < rank:
            raise ExportError(f"lora='inputs': the exported rank {target} at {path!r} is below the "
                              f"active adapter's rank {rank}; export with a rank of at least {rank}")
        if target > rank:  # zero rows of A and columns of B add nothing to x @ A^T @ B^T
            a = torch.cat([a, a.new_zeros(target - rank, a.shape[1])], 0)
            b = torch.cat([b, b.new_zeros(b.shape[0], target - rank)], 1)
        for which, value, rank_axis in zip(("lora_A", "lora_B"), input_layout(a, b, scale), (1, 0)):
            buffer = ".".join(p for p in (LORA_INPUT_ROOT, path, which) if p)
            set_tensor(gm, buffer, value, parameter=False)
            name = adapter_input_name(path, which)
            self.lora_inputs.append(LoraInput(name, buffer, path, which, rank_axis, tuple(value.shape)))
            names.append(buffer)
        return names[0], names[1]

    def ensures(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if meta.role(node) not in ("lora_a", "lora_b"):
                continue
            weight = node.args[1]
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr"
                    and str(weight.target).startswith(f"{LORA_INPUT_ROOT}.")):
                raise PassError(f"{self.name}: {node.name} at {meta.info(node).get('module_path')!r} "
                                "does not read a LoRA input weight")
