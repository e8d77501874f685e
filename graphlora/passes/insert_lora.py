"""Insert (and remove) LoRA branches: ``y = base(x) + B(scale * A(dropout(x)))``.

The branch reads the site's own input and adds to the site's own output, so it is correct for
every spelling :mod:`graphlora.sites` recognises (a ``Conv1D`` ``addmm`` on a 2-D view, a
``matmul`` against a transposed parameter, ...). A weight used at several places gets one LoRA
pair applied at each use, like PEFT's module-level adapters. A use that reads the parameter in the
opposite orientation of its first use sees the transposed delta, computed as
``(x @ B) @ A`` so the pair keeps PEFT's shapes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.fx as fx

from graphlora import meta
from graphlora.adapters import LoraSpec, adapter_dtype, create_lora_pair, create_magnitude, lora_param_name
from graphlora.dora import MAGNITUDE, row_norms
from graphlora.branches import check_no_lora, find_branches, remove
from graphlora.errors import PassError
from graphlora.graph_utils import copy_stack, fake_mode, get_tensor, insert_call, insert_get_attr
from graphlora.passes.base import GraphPass, PassResult
from graphlora.sites import LinearSite, tagged_sites

aten = torch.ops.aten


def param_features(site: LinearSite) -> tuple[int, int]:
    """(in, out) of the parameter in its stored orientation, which fixes the LoRA shapes."""
    s = site.spec
    if s.use_layout == s.param_layout:
        return s.in_features, s.out_features
    return s.out_features, s.in_features


@dataclass
class InsertLoraPass(GraphPass):
    """Add one adapter's branches to the sites named in ``specs`` (module path -> LoraSpec)."""

    adapter: str
    specs: Mapping[str, LoraSpec]
    training: bool = False
    #: Mixed-adapter batches: ``(graph input, row)``. The input holds one 0/1 gate per adapter and
    #: batch row; this adapter's branch output is multiplied, row by row, by gate ``row``.
    gate: tuple[str, int] | None = None

    @property
    def name(self) -> str:
        return f"InsertLoraPass[{self.adapter}]"

    def call(self, gm: fx.GraphModule) -> PassResult:
        mode = fake_mode(gm)
        modified = False
        rank_vals: dict = {}  # fake values of rank-r intermediates, shared across like shapes
        gate = None
        if self.gate is not None:
            name, row = self.gate
            found = [n for n in gm.graph.nodes if n.op == "placeholder" and n.target == name]
            if not found:
                raise PassError(f"{self.name}: the graph has no input {name!r} to gate rows with")
            gate = (found[0], row)
        for site in tagged_sites(gm):
            spec = self.specs.get(site.module_path)
            if spec is None:
                continue
            _insert_branch(gm, site, self.adapter, spec, self.training, mode, rank_vals, gate)
            modified = True
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        have = {meta.info(n).get("site_key") for n in gm.graph.nodes
                if meta.role(n) == "lora_add" and meta.info(n).get("adapter") == self.adapter}
        missing = [s.spec.key for s in tagged_sites(gm)
                   if s.module_path in self.specs and s.spec.key not in have]
        if missing:
            raise PassError(f"{self.name}: sites {', '.join(missing[:5])} got no LoRA branch")


def _insert_branch(gm, site: LinearSite, adapter: str, spec: LoraSpec, training: bool, mode, rank_vals: dict,
                   gate: tuple[fx.Node, int] | None = None) -> None:
    graph = gm.graph
    in_f, out_f = param_features(site)
    dtype = adapter_dtype(getattr(torch, site.spec.weight_dtype), spec.autocast_dtype)
    kind = site.spec.site_kind
    if gate is not None and kind == "experts":
        raise PassError(f"{site.spec.key!r}: an experts site's rows are tokens sorted by expert, not "
                        "batch rows, so a mixed-adapter batch cannot gate them; run one adapter per call")
    a_name, b_name = create_lora_pair(
        gm, adapter, site.module_path, spec, in_f, out_f, dtype=dtype, device=site.spec.weight_device,
        site_kind=kind, conv=site.spec.conv, experts=1 if spec.share_experts else site.spec.num_experts,
    )
    dtype = get_tensor(gm, a_name).dtype  # an existing pair keeps the dtype it was made with
    path = site.module_path
    tags = dict(module_path=path, adapter=adapter, site_key=site.spec.key)
    out = site.output
    # Insert after the last node the branch depends on, right after the site's output.
    with graph.inserting_after(out):
        a_w = insert_get_attr(graph, a_name, role="weight", mode=mode, tensor="lora_A", **tags)
    with graph.inserting_after(a_w):
        b_w = insert_get_attr(graph, b_name, role="weight", mode=mode, tensor="lora_B", **tags)
    cursor = b_w
    x = site.input
    new_nodes = [a_w, b_w]
    if spec.use_dora:
        m_w = _magnitude_read(gm, site, adapter, spec, b_w, mode, tags)
        cursor = m_w
        new_nodes.append(m_w)

    def emit(target, args, role, like=None, rank_key=None, kwargs=None, val=None):
        nonlocal cursor
        if rank_key is not None:
            val = rank_vals.get(rank_key)
        with graph.inserting_after(cursor):
            node = insert_call(graph, target, args, kwargs, role=role, mode=mode, val_like=like, val=val, **tags)
        if rank_key is not None and "val" in node.meta:
            rank_vals.setdefault(rank_key, node.meta["val"])
        new_nodes.append(node)
        cursor = node
        return node

    # PEFT's mixed precision (autocast_adapter_dtype): factors in float32 on a bf16/fp16 base read
    # the input cast to their dtype, and the sum ``base + branch`` (promoted to float32) is cast
    # back to the base output's dtype. Same dtypes: no cast, the graph PEFT's layer computes.
    x_val, out_val = x.meta.get("val"), out.meta.get("val")
    base_dtype = getattr(torch, site.spec.weight_dtype)  # the site's dtype when shapes are unknown
    x_dtype = x_val.dtype if isinstance(x_val, torch.Tensor) else base_dtype
    out_dtype = out_val.dtype if isinstance(out_val, torch.Tensor) else x_dtype
    # an embedding's input is token ids: the lookup into A^T already gives the factors' dtype
    casting = (out_dtype if kind == "embedding" else x_dtype) != dtype
    wide = _as_dtype(out_val, dtype, mode, rank_vals) if casting else None  # base-output shape
    if casting and kind != "embedding":
        x = emit(aten._to_copy.default, (x,), "lora_cast_in", kwargs={"dtype": dtype},
                 val=_as_dtype(x_val, dtype, mode, rank_vals))
        x_val = x.meta.get("val")
    rank_key = None
    if isinstance(x_val, torch.Tensor) and kind in ("linear", "embedding"):  # others: by their geometry
        rank_key = (kind, str(tuple(x_val.shape)), x_val.dtype, str(x_val.device), spec.rank)

    # The scale multiplies the rank-r intermediate rather than the (.., out) result: the same
    # function as PEFT's ``B(A(x)) * scale`` up to float rounding, at r/out of the cost (in
    # backward too). Shapes: dropout/mul keep their input's, the branch output is the base
    # output's, so only the rank-r tensor needs a fake value of its own.
    like_out = None if casting else out
    if spec.dropout > 0 and kind != "embedding":  # PEFT's embedding LoRA has no dropout either
        x = emit(aten.dropout.default, (x, float(spec.dropout), training), "lora_dropout", like=x)
    if kind == "embedding":  # PEFT's: embedding(ids, A^T) @ B^T * s
        table = emit(aten.t.default, (a_w,), "lora_view")
        lookup = (table, x) if site.spec.padding_idx is None else (table, x, site.spec.padding_idx)
        h = emit(aten.embedding.default, lookup, "lora_a", rank_key=rank_key)
        h = emit(aten.mul.Tensor, (h, float(spec.scale)), "lora_scale", like=h)
        h = emit(aten.linear.default, (h, b_w), "lora_b", like=like_out, val=wide)
    elif kind == "conv":  # PEFT's: A slides like the site's kernel, B is 1x1 in the site's groups
        g = site.spec.conv
        conv_op = _CONV_OPS[g.dims][isinstance(g.padding, str)]
        h = emit(conv_op, (x, a_w, None, list(g.stride), g.padding if isinstance(g.padding, str)
                           else list(g.padding), list(g.dilation), 1), "lora_a")
        h = emit(aten.mul.Tensor, (h, float(spec.scale)), "lora_scale", like=h)
        ones = [1] * g.dims
        h = emit(_CONV_OPS[g.dims][False], (h, b_w, None, ones, [0] * g.dims, ones, g.groups), "lora_b",
                 like=like_out, val=wide)
    elif kind == "experts":
        h = _experts_branch(site, spec, a_w, b_w, x, in_f, out_f, emit, like_out, wide)
    elif kind == "einsum":  # x with A on the parameter's contracted labels, then B onto its free ones
        g = site.spec.einsum
        rank = g.spare_label()
        a_v = emit(aten.reshape.default, (a_w, [spec.rank, *g.in_dims]), "lora_view")
        b_v = emit(aten.reshape.default, (b_w, [*g.out_dims, spec.rank]), "lora_view")
        kept = "".join(c for c in g.out if c not in g.out_labels) + rank
        h = emit(aten.einsum.default, (f"{g.x},{rank}{g.in_labels}->{kept}", [x, a_v]), "lora_a")
        h = emit(aten.mul.Tensor, (h, float(spec.scale)), "lora_scale", like=h)
        h = emit(aten.einsum.default, (f"{kept},{g.out_labels}{rank}->{g.out}", [h, b_v]), "lora_b",
                 like=like_out, val=wide)
    elif site.spec.use_layout == site.spec.param_layout:
        h = emit(aten.linear.default, (x, a_w), "lora_a", rank_key=rank_key)
        h = emit(aten.mul.Tensor, (h, float(spec.scale)), "lora_scale", like=h)
        h = emit(aten.linear.default, (h, b_w), "lora_b", like=like_out, val=wide)
    else:  # the transposed delta: x @ (B A)
        h = emit(aten.matmul.default, (x, b_w), "lora_b")
        h = emit(aten.mul.Tensor, (h, float(spec.scale)), "lora_scale", like=h)
        h = emit(aten.matmul.default, (h, a_w), "lora_a", like=like_out, val=wide)
    if spec.use_dora:
        h = _dora_mix(site, spec, a_w, b_w, m_w, x, out, h, emit)
    if gate is not None:
        # rows lead every activation, (batch, ...) or flattened (batch * tokens, ...): as PEFT's
        # mixed batches, gate the branch output per batch row, viewed as (batch, everything else)
        g = emit(aten.select.int, (gate[0], 0, gate[1]), "lora_gate")
        rows = emit(aten.sym_size.int, (g, 0), "lora_gate")
        flat = emit(aten.reshape.default, (h, [rows, -1]), "lora_gate")
        column = emit(aten.type_as.default, (emit(aten.unsqueeze.default, (g, 1), "lora_gate"), flat), "lora_gate")
        flat = emit(aten.mul.Tensor, (flat, column), "lora_gate", like=flat)
        h = emit(aten.reshape_as.default, (flat, h), "lora_gate", like=h)
    total = emit(aten.add.Tensor, (out, h), "lora_add", like=like_out, val=wide)
    if casting:
        total = emit(aten._to_copy.default, (total,), "lora_cast_out", kwargs={"dtype": out_dtype},
                     like=out)
    copy_stack(out, *new_nodes)
    out.replace_all_uses_with(total, delete_user_cb=lambda user: user not in new_nodes)


def _experts_branch(site: LinearSite, spec: LoraSpec, a_w, b_w, x, in_f: int, out_f: int, emit, like_out,
                    wide) -> fx.Node:
    """Each token through its own expert's pair, with the op the site uses: the stacked factors
    viewed per expert (graphlora.branches.expert_factors: ``(E, r, in)``, ``(E, out, r)``), then
    the same grouped GEMM over the same offsets, or ``bmm`` of the rows the same expert ids pick."""
    experts, rank = site.spec.num_experts, spec.rank
    if spec.share_experts:  # one pair for all: the same B A after every expert's weight
        if site.spec.expert_op == "bmm" and site.spec.weight_index == 0:  # W[ids] @ x (S, in, 1)
            h = emit(aten.matmul.default, (a_w, x), "lora_a")
            h = emit(aten.mul.Tensor, (h, float(spec.scale)), "lora_scale", like=h)
            return emit(aten.matmul.default, (b_w, h), "lora_b", like=like_out, val=wide)
        h = emit(aten.linear.default, (x, a_w), "lora_a")  # x (S, in) or (S, 1, in)
        h = emit(aten.mul.Tensor, (h, float(spec.scale)), "lora_scale", like=h)
        return emit(aten.linear.default, (h, b_w), "lora_b", like=like_out, val=wide)
    a3 = emit(aten.reshape.default, (a_w, [experts, rank, in_f]), "lora_view")
    b3 = emit(aten.reshape.default, (b_w, [out_f, rank, experts]), "lora_view")
    b3 = emit(aten.permute.default, (b3, [2, 0, 1]), "lora_view")
    if site.spec.expert_op == "grouped_mm":  # (S, in) x (E, in, r) -> (S, r) x (E, r, out)
        offsets = site.node.args[2]
        a_t = emit(aten.transpose.int, (a3, 1, 2), "lora_view")
        h = emit(site.node.target, (x, a_t, offsets), "lora_a")
        h = emit(aten.mul.Tensor, (h, float(spec.scale)), "lora_scale", like=h)
        b_t = emit(aten.transpose.int, (b3, 1, 2), "lora_view")
        return emit(site.node.target, (h, b_t, offsets), "lora_b", like=like_out, val=wide)
    ids = site.node.args[site.spec.weight_index].args[1]
    if site.spec.weight_index == 0:  # W[ids] (S, out, in) @ x (S, in, 1)
        h = emit(aten.bmm.default, (emit(aten.index.Tensor, (a3, ids), "lora_view"), x), "lora_a")
        h = emit(aten.mul.Tensor, (h, float(spec.scale)), "lora_scale", like=h)
        return emit(aten.bmm.default, (emit(aten.index.Tensor, (b3, ids), "lora_view"), h), "lora_b",
                    like=like_out, val=wide)
    a_t = emit(aten.transpose.int, (a3, 1, 2), "lora_view")  # x (S, 1, in) @ W[ids] (S, in, out)
    h = emit(aten.bmm.default, (x, emit(aten.index.Tensor, (a_t, ids), "lora_view")), "lora_a")
    h = emit(aten.mul.Tensor, (h, float(spec.scale)), "lora_scale", like=h)
    b_t = emit(aten.transpose.int, (b3, 1, 2), "lora_view")
    return emit(aten.bmm.default, (h, emit(aten.index.Tensor, (b_t, ids), "lora_view")), "lora_b",
                like=like_out, val=wide)


#: convolution ops by dims: (integer padding, string padding "same"/"valid")
_CONV_OPS = {1: (aten.conv1d.default, aten.conv1d.padding), 2: (aten.conv2d.default, aten.conv2d.padding),
             3: (aten.conv3d.default, aten.conv3d.padding)}


def _magnitude_read(gm, site: LinearSite, adapter: str, spec: LoraSpec, after: fx.Node, mode,
                    tags: dict) -> fx.Node:
    """The DoRA magnitude's read, the magnitude made first from the row norms of the weight the
    site computes with (dequantized for a quantized base), as PEFT initialises it."""
    s = site.spec
    if s.use_layout != s.param_layout:
        raise PassError(f"DoRA at {site.spec.key!r}: the site reads its weight in the other orientation "
                        "(a parameter used both ways); DoRA is supported on ordinary linear uses only")
    weight = site.param_value().detach()
    weight = weight if s.param_layout == "out_in" else weight.t()
    dtype = get_tensor(gm, lora_param_name(adapter, site.module_path, "lora_A")).dtype
    name = create_magnitude(gm, adapter, site.module_path, row_norms(weight).to(dtype))
    with gm.graph.inserting_after(after):
        return insert_get_attr(gm.graph, name, role="weight", mode=mode, tensor=MAGNITUDE, **tags)


def _dora_mix(site: LinearSite, spec: LoraSpec, a_w, b_w, m_w, x, out, h, emit) -> fx.Node:
    """DoRA's addition to the base output (graphlora.dora): ``(m/n - 1) * x W^T + (m/n) * h`` with
    ``h`` the LoRA branch's output and ``n`` the detached row norms of ``W + s B A``; ``x W^T`` is
    the base output less its bias, or, with dropout, the base applied to the dropped-out input."""
    w = site.weight_input
    if site.spec.use_layout == "in_out":
        w = emit(aten.t.default, (w,), "dora_norm")
    ba = emit(aten.mm.default, (b_w, a_w), "dora_norm")
    full = emit(aten.add.Tensor, (w, ba), "dora_norm", kwargs={"alpha": float(spec.scale)})
    norm = emit(aten.linalg_vector_norm.default, (full, 2.0, [1]), "dora_norm")
    norm = emit(aten.detach.default, (norm,), "dora_norm")
    ratio = emit(aten.div.Tensor, (m_w, norm), "dora_scale")
    if spec.dropout > 0:
        base = emit(aten.linear.default, (x, w), "dora_mix")
    else:
        bias = site.bias
        base = out if bias is None else emit(aten.sub.Tensor, (out, bias), "dora_mix")
    shifted = emit(aten.sub.Tensor, (ratio, 1.0), "dora_mix")
    rescaled = emit(aten.mul.Tensor, (base, shifted), "dora_mix")
    lora = emit(aten.mul.Tensor, (h, ratio), "dora_mix")
    return emit(aten.add.Tensor, (rescaled, lora), "dora_mix")


def _as_dtype(val, dtype: torch.dtype, mode, cache: dict):
    """A fake value like ``val`` in ``dtype`` (shared across like shapes, as rank values are)."""
    if not isinstance(val, torch.Tensor):
        return None
    key = ("as", str(tuple(val.shape)), val.dtype, str(val.device), dtype)
    if key not in cache:
        with mode if mode is not None else contextlib.nullcontext():
            cache[key] = val.to(dtype)
    return cache[key]


class RemoveLoraPass(GraphPass):
    """Take every LoRA branch out of the graph (used to switch or disable adapters)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        found = find_branches(gm)
        remove(*found)
        return PassResult(gm, bool(found))

    def ensures(self, gm: fx.GraphModule) -> None:
        check_no_lora(gm, self.name)

