"""Grouped expert GEMMs as ops ONNX has: ``grouped_mm(x, W, offsets)`` becomes a gather of each
token's expert weight and a batched matmul.

transformers' ``grouped_mm`` experts run ``transformers::grouped_mm_fallback`` (or
``aten._grouped_mm``): tokens sorted by expert, ``offsets[e]`` the end of expert ``e``'s rows. ONNX
has no grouped GEMM and the exporter has no translation for either op, so before export each call
becomes ``bmm(x[:, None], W[ids])[:, 0]`` with ``ids[t]`` = the number of offsets ``<= t`` (the
expert whose rows hold token ``t``). Same products, one per token: exact, at the cost of one
gathered ``(in, out)`` weight per token, which is what the ``batched_mm`` experts compute too.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphlora.graph_utils import fake_mode, insert_call
from graphlora.passes.export_base import ExportPass
from graphlora.passes.base import PassResult
from graphlora.sites import is_grouped_mm

aten = torch.ops.aten


class GroupedMatmulAsGatherPass(ExportPass):
    """Rewrite every grouped expert GEMM into a gather and a batched matmul."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        mode = fake_mode(gm)
        graph = gm.graph
        found = [n for n in graph.nodes if is_grouped_mm(n)]
        for node in found:
            x, weight, offsets = node.args
            with graph.inserting_before(node):
                def emit(target, args, kwargs=None):
                    return insert_call(graph, target, args, kwargs, mode=mode)

                rows = emit(aten.sym_size.int, (x, 0))
                positions = emit(aten.arange.default, (rows,), {"dtype": torch.int64, "device": x.meta["val"].device})
                ends = emit(aten.unsqueeze.default, (emit(aten._to_copy.default, (offsets,), {"dtype": torch.int64}), 0))
                passed = emit(aten.le.Tensor, (ends, emit(aten.unsqueeze.default, (positions, 1))))
                ids = emit(aten.sum.dim_IntList, (passed, [1]))
                picked = emit(aten.index.Tensor, (weight, [ids]))
                product = emit(aten.bmm.default, (emit(aten.unsqueeze.default, (x, 1)), picked))
                out = emit(aten.squeeze.dim, (product, 1))
            out.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "graphlora")})
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        return PassResult(gm, bool(found))
