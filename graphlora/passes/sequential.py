"""Sequential calibration of data-driven weight methods, one block at a time.

Methods such as GPTQ quantize each weight from statistics of the inputs its site sees *with every
weight before it already quantized*, so each weight also compensates its predecessors' error.
The standard schedule (GPTQ's reference code, GPTQModel, llmcompressor) runs that in one pass
over the depth: cache each block's inputs once, calibrate the block's weights in dependency
order on the block's own recomputed activations (the reference code's "true sequential";
llmcompressor collects a whole block at once), then run the quantized block to get the next
block's inputs. Each block's compute is paid a few times (once per dependency wave inside the
block, once to propagate), never the compute of the blocks before it.

Here the blocks come from the graph (:func:`graphlora.block_split.find_transformer_blocks` and
:func:`graphlora.block_split.plan_segments`, the cut FSDP uses), so any traced model with repeated
blocks gets the schedule, not only transformers with a known layer list. Code outside the blocks
(embeddings, masks, a head) runs as segments of its own, and a segment whose values nothing
calibrated needs (the head after the last calibrated weight) is never run. Memory: the values
that cross a segment boundary, for every calibration batch (the hidden states, masks, rotary
tables), plus one segment's activations for one batch at a time.

Where the graph has no blocks (or cannot be cut at them, or a weight is used in several blocks),
the *wave* schedule runs instead: the whole graph is one segment, so each dependency wave runs
the model from its input up to the wave's last site. Same results, quadratic cost in depth.

A method plugs in through :class:`SequentialMethod`: a collector per site input (GPTQ: a Hessian
accumulator), a reduction across ranks, and a ``solve`` that turns what was collected into an
encoding and codes. The engine substitutes each solved weight (dequantized codes) for the rest of
its block and restores the float weights at the end; installing the encodings in the graph is the
calling pass's job, so an interrupted calibration leaves the graph as it was.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.fx as fx
import torch.nn as nn

from graphlora import batches as batch_feed
from graphlora.block_split import (
    BlockError, Segment, check_blocks, compile_graph, find_transformer_blocks, plan_segments, subgraph,
)
from graphlora.errors import QuantizationError
from graphlora.graph_utils import ensure_container
from graphlora.quant import Encoding
from graphlora.sites import LinearSite

__all__ = [
    "Schedule", "SequentialMethod", "SequentialResult", "WeightSolution", "calibrate_sequentially",
    "dependency_waves",
]

CAPTURE_ROOT = "graphlora_sequential_capture"


class Collector(Protocol):
    """What a method gathers from one site input: called with each batch's input tensor."""

    def add(self, x: torch.Tensor) -> None: ...


@dataclass(frozen=True, eq=False)
class WeightSolution:
    """A method's result for one weight: its encoding and codes (parameter layout)."""

    encoding: Encoding
    codes: torch.Tensor


class SequentialMethod(Protocol):
    """A data-driven weight method run by :func:`calibrate_sequentially`."""

    def collector(self, name: str, in_features: int) -> Collector:
        """A fresh collector for one site input of weight ``name`` (shared by every weight of the
        wave that reads the same input: q, k and v of one attention block)."""

    def reduce(self, collectors: list[Collector]) -> None:
        """Combine the wave's collectors across ranks (a no-op without torch.distributed)."""

    def solve(self, name: str, sites: list[LinearSite], collected: list[Collector]) -> WeightSolution:
        """Quantize the weight ``name`` read by ``sites`` from its inputs' collectors."""


@dataclass
class Schedule:
    """Which schedule ran: ``"blocks"`` (one pass over the depth, ``blocks`` in order) or
    ``"waves"`` (the whole graph per dependency wave; ``reason`` says why)."""

    kind: Literal["blocks", "waves"]
    blocks: list[str] = field(default_factory=list)
    reason: str | None = None

    def __str__(self) -> str:
        if self.kind == "blocks":
            return f"block-wise over {len(self.blocks)} blocks ({self.blocks[0]} ... {self.blocks[-1]})"
        return f"wave schedule ({self.reason})"


@dataclass
class SequentialResult:
    """Every weight's solution (in the order solved), the schedule, and the seconds each
    segment took (label: its block path, ``<root>`` for code outside the blocks)."""

    solutions: dict[str, WeightSolution]
    schedule: Schedule
    seconds: list[tuple[str, float]]


class _StopForward(Exception):
    """Raised by the last capture of a wave: the rest of the segment is not needed."""


class _Capture(nn.Module):
    """A site input inside a segment's graph: feeds this wave's collectors, stops at the last."""

    def __init__(self):
        super().__init__()
        self.collectors: list[Collector] = []
        self.stop = False
        self.position = 0  # index of its node in the segment's graph

    def forward(self, x):
        for c in self.collectors:
            c.add(x.detach())
        if self.stop:
            raise _StopForward
        return x


class _Inputs(Exception):
    def __init__(self, values):
        super().__init__()
        self.values = values


class _InputCapture(nn.Module):
    def forward(self, *values):
        raise _Inputs(values)


def calibrate_sequentially(
    gm: fx.GraphModule,
    groups: Mapping[str, list[LinearSite]],
    data: Sequence[Any],
    method: SequentialMethod,
    *,
    schedule: Literal["auto", "blocks", "waves"] = "auto",
    blocks: Sequence[str] | str | None = None,
    progress: bool = True,
    desc: str = "calibration",
) -> SequentialResult:
    """Solve every weight group of ``groups`` (name -> its sites) with ``method`` on ``data``.

    ``schedule="auto"`` runs block by block where the graph has blocks (``blocks``: module
    paths or a regex fullmatching them; default :func:`graphlora.block_split.find_transformer_blocks`) and falls
    back to the wave schedule where it has none; ``"blocks"`` refuses the fallback (raises
    :class:`QuantizationError` saying why); ``"waves"`` always runs the wave schedule. The graph
    is left unchanged: the caller installs the returned solutions.
    """
    if schedule not in ("auto", "blocks", "waves"):
        raise QuantizationError(f"unknown calibration schedule {schedule!r}; use 'auto', 'blocks' or 'waves'")
    waves = dependency_waves(gm, groups)
    plan, chosen = _plan(gm, groups, schedule, blocks, desc)
    return _Run(gm, groups, list(data), method, plan, waves, chosen, progress, desc).run()


def _plan(gm, groups, schedule, blocks, desc) -> tuple[list[Segment], Schedule]:
    whole = [Segment(None, [n for n in gm.graph.nodes if n.op != "output"])]
    if schedule == "waves":
        return whole, Schedule("waves", reason="asked for")
    if isinstance(blocks, str) or blocks is None:
        paths = find_transformer_blocks(gm, blocks, source=f"{desc} blocks")
    else:
        paths = list(blocks)
        problem = check_blocks(dict(gm.named_modules()), paths)
        if problem is not None:
            raise QuantizationError(problem)
    reason = None
    if not paths:
        reason = "the graph has no repeated blocks (no module with integer-named children)"
    else:
        try:
            segments, _ = plan_segments(gm.graph, paths)
        except BlockError as exc:
            reason = f"the graph cannot be cut at its blocks: {exc}"
        else:
            stage_of = {n: i for i, seg in enumerate(segments) for n in seg.nodes}
            for name, sites in groups.items():
                stages = sorted({stage_of[s.node] for s in sites})
                if len(stages) > 1:
                    where = [segments[i].block or "<outside the blocks>" for i in stages]
                    reason = f"{name} is used in several segments ({', '.join(where[:3])})"
                    break
            else:
                return segments, Schedule("blocks", blocks=paths)
    if schedule == "blocks":
        raise QuantizationError(f"block-wise calibration is not possible: {reason}; use schedule='auto' or 'waves'")
    return whole, Schedule("waves", reason=reason)


class _Run:
    """One calibration: segments run in order over cached per-batch boundary values."""

    def __init__(self, gm, groups, data, method, segments, waves, schedule, progress, desc):
        self.gm, self.groups, self.data, self.method = gm, dict(groups), data, method
        self.segments, self.waves, self.schedule = segments, waves, schedule
        self.progress, self.desc = progress, desc
        self.solutions: dict[str, WeightSolution] = {}
        self.originals: dict[str, tuple[dict, str, torch.Tensor]] = {}
        self.seconds: list[tuple[str, float]] = []

    def run(self) -> SequentialResult:
        stage_of = {n: i for i, seg in enumerate(self.segments) for n in seg.nodes}
        by_stage: dict[int, list[str]] = {}
        for name, sites in self.groups.items():
            by_stage.setdefault(stage_of[sites[0].node], []).append(name)
        needed, outputs, inputs = _needed(self.segments, by_stage)
        last_use: dict[fx.Node, int] = {}
        for i in needed:
            for x in inputs[i]:
                last_use[x] = i
        container = ensure_container(self.gm, CAPTURE_ROOT)
        bar = self._bar(needed, by_stage)
        try:
            envs = self._capture_inputs(set(last_use))
            for i in needed:
                start = time.perf_counter()
                self._stage(i, by_stage.get(i, []), outputs[i], envs, container, bar)
                for env in envs:
                    for x in [x for x in env if last_use.get(x, -1) <= i]:
                        del env[x]
                self.seconds.append((self.segments[i].block or "<root>", time.perf_counter() - start))
                if bar is not None and self.schedule.kind == "blocks" and self.segments[i].block is not None:
                    bar.set_postfix_str(self.segments[i].block, refresh=False)
                    bar.update(1)
        finally:
            self._restore()
            self.gm._modules.pop(CAPTURE_ROOT, None)
            if bar is not None:
                bar.close()
        return SequentialResult(self.solutions, self.schedule, self.seconds)

    def _bar(self, needed, by_stage):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        if self.schedule.kind == "blocks":
            blocks = [i for i in needed if self.segments[i].block is not None]
            return tqdm(total=len(blocks), desc=f"{self.desc} blocks", leave=False)
        return tqdm(total=len(self.waves), desc=f"{self.desc} waves", leave=False)

    def _capture_inputs(self, wanted: set[fx.Node]) -> list[dict[fx.Node, Any]]:
        """Each batch's placeholder values, as the graph's own forward flattens them."""
        graph = self.gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.gm._modules[CAPTURE_ROOT].add_module("inputs", _InputCapture())
        anchor = placeholders[-1] if placeholders else next(iter(graph.nodes))
        with graph.inserting_after(anchor) if placeholders else graph.inserting_before(anchor):
            node = graph.call_module(f"{CAPTURE_ROOT}.inputs", tuple(placeholders))
        self.gm.recompile()
        envs = []
        try:
            for batch in self.data:
                try:
                    batch_feed.call(self.gm, batch)
                except _Inputs as got:
                    envs.append({p: v for p, v in zip(placeholders, got.values) if p in wanted})
                else:  # pragma: no cover - the capture always raises
                    raise QuantizationError("calibration could not read the graph's inputs")
        finally:
            graph.erase_node(node)
            self.gm.recompile()
        return envs

    def _stage(self, i: int, names: list[str], outputs: set[fx.Node], envs, container, bar) -> None:
        seg = self.segments[i]
        sub = subgraph(seg.nodes, used_outside=outputs.__contains__, copy_reads=True)
        captures = self._insert_captures(sub, names, container, i)
        fn = compile_graph(sub.graph, seg.block or "segment")
        clone = _mutates(sub.graph)
        inside = set(names)

        def run_all(keep: bool) -> None:
            with torch.no_grad():
                for env in envs:
                    args = [env[x] for x in sub.inputs]
                    if clone:
                        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
                    try:
                        values = fn(self.gm, *args)
                    except _StopForward:
                        continue
                    if keep:
                        env.update(zip(sub.outputs, values))

        for wave in self.waves:
            wave = [n for n in wave if n in inside]
            if not wave:
                continue
            collectors = self._arm(wave, captures)
            run_all(keep=False)
            for c in captures.values():
                c.collectors, c.stop = [], False
            self.method.reduce(list(collectors.values()))
            for name in wave:
                sites = self.groups[name]
                got = list(dict.fromkeys(collectors[s.input] for s in sites))  # a shared input counts once per use
                solution = self.method.solve(name, sites, got)
                self._substitute(name, solution)
                self.solutions[name] = solution
            if bar is not None and self.schedule.kind == "waves":
                bar.update(1)
        if sub.outputs:
            run_all(keep=True)
        if self.schedule.kind == "blocks":
            self._restore()  # later segments read these weights only where they are tied

    def _insert_captures(self, sub, names, container, i) -> dict[fx.Node, _Capture]:
        """One capture per distinct site input of the segment (a flat-graph node)."""
        graph = sub.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        captures: dict[fx.Node, _Capture] = {}
        nodes: dict[fx.Node, fx.Node] = {}
        for name in names:
            for site in self.groups[name]:
                x = site.input
                if x in captures:
                    continue
                copy = sub.nodes[x]
                capture = _Capture()
                container.add_module(f"{i}_{len(captures)}", capture)
                anchor = placeholders[-1] if copy.op == "placeholder" else copy
                with graph.inserting_after(anchor):
                    nodes[x] = graph.call_module(f"{CAPTURE_ROOT}.{i}_{len(captures)}", (copy,))
                captures[x] = capture
        order = {n: k for k, n in enumerate(graph.nodes)}
        for x, capture in captures.items():
            capture.position = order[nodes[x]]
        return captures

    def _arm(self, wave: list[str], captures: dict[fx.Node, _Capture]) -> dict[fx.Node, Collector]:
        collectors: dict[fx.Node, Collector] = {}
        for name in wave:
            for site in self.groups[name]:
                if site.input not in collectors:
                    collectors[site.input] = self.method.collector(name, site.spec.in_features)
                    captures[site.input].collectors = [collectors[site.input]]
        last = max((captures[x] for x in collectors), key=lambda c: c.position)
        last.stop = True
        return collectors

    def _substitute(self, name: str, solution: WeightSolution) -> None:
        """The rest of the segment computes with the solved weight (dequantized codes)."""
        head, _, leaf = name.rpartition(".")
        owner = self.gm.get_submodule(head) if head else self.gm
        table = owner._parameters if leaf in owner._parameters else owner._buffers
        original = table[leaf]
        value = solution.encoding.dequantize(solution.codes, original.dtype).to(original.device)
        if name not in self.originals:
            self.originals[name] = (table, leaf, original)
        # assigned in place in the table, so the parameter order (state-dict keys) is kept
        table[leaf] = nn.Parameter(value, requires_grad=False) if table is owner._parameters else value

    def _restore(self) -> None:
        for table, leaf, original in self.originals.values():
            table[leaf] = original
        self.originals.clear()


def _needed(segments: list[Segment], by_stage: dict[int, list[str]]):
    """Which segments must run (they hold weights to calibrate or compute values such a segment
    reads), and each one's outputs and inputs. Attribute reads are not values: every segment
    reads its tensors itself."""
    wanted: set[fx.Node] = set()
    needed: list[int] = []
    outputs: dict[int, set[fx.Node]] = {}
    inputs: dict[int, list[fx.Node]] = {}
    for i in range(len(segments) - 1, -1, -1):
        nodes = [n for n in segments[i].nodes if n.op != "placeholder"]
        inside = set(nodes)
        mine = {n for n in nodes if n in wanted}
        if i not in by_stage and not mine:
            continue
        needed.append(i)
        outputs[i] = mine
        inputs[i] = list(dict.fromkeys(
            a for n in nodes for a in n.all_input_nodes if a not in inside and a.op != "get_attr"))
        wanted.update(inputs[i])
    return needed[::-1], outputs, inputs


_INPLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
            operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.setitem}


def _mutates(graph: fx.Graph) -> bool:
    """Whether a segment may write into a tensor (symbolic traces keep in-place ops): its cached
    inputs are then copied for every run, so re-running it (one run per wave) sees them intact."""
    for node in graph.nodes:
        if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
            return True
        if node.op == "call_function":
            target = node.target
            schema = getattr(target, "_schema", None)
            if target in _INPLACE or (schema is not None and schema.is_mutable):
                return True
            if getattr(target, "__name__", "").endswith("_") and not getattr(target, "__name__", "").startswith("_"):
                return True
    return False


def dependency_waves(gm: fx.GraphModule, groups: Mapping[str, list[LinearSite]]) -> list[list[str]]:
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
        if not wave:  # a weight whose input depends on its own output (a weight shared along a path)
            raise QuantizationError(
                f"sequential calibration could not order the weights by their dependencies: "
                f"{remaining[0]} depends on weights that depend on it")
        waves.append(wave)
        for n in wave:
            done |= bit[n]
        remaining = [n for n in remaining if n not in wave]
    return waves


def _or(values: Iterable[int]) -> int:
    out = 0
    for v in values:
        out |= v
    return out
