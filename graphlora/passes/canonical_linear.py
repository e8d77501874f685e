"""Every linear site as ``aten.linear(x, W_(out, in), bias)``: the form execution fusion rewrites.

A model's linear layers reach the graph as ``linear``, ``addmm`` (transformers ``Conv1D``), ``mm``
or ``x @ W.T``; :mod:`graphlora.sites` knows those spellings and turns each recognised site into
the one canonical op (:meth:`~graphlora.sites.LinearSite.as_linear`). Run first on the execution
copy (:func:`graphlora.passes.fuse_siblings.fused_copy`), it lets LoRA fusion and sibling fusion
match that single op and still cover every site, so a GPT-2 runs as fused as a BERT. Never run
on the canonical graph, which keeps the model's spellings for saving, export and the graph diff.
"""

from __future__ import annotations

import torch.fx as fx

from graphlora.passes.base import GraphPass, PassResult
from graphlora.sites import find_linear_sites, tagged_sites


class CanonicalLinearPass(GraphPass):
    """Rewrite every site into ``aten.linear`` (sites that cannot be are left as they are).

    Tagged sites (those a rule matched, whatever their weight now is: a dequantize, ...) and the
    sites no rule matched, which sibling fusion joins as well.
    """

    def call(self, gm: fx.GraphModule) -> PassResult:
        tagged = tagged_sites(gm)
        seen = {s.node for s in tagged}
        untagged = [s for s in find_linear_sites(gm) if s.node not in seen]
        modified = False
        for site in tagged + untagged:
            modified |= site.as_linear()
        return PassResult(gm, modified)
