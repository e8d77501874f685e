"""Fuse a linear site and its LoRA branch into one op with a hand-written backward.

``y = x W^T + b + s (x A^T) B^T`` is, for the forward, ``x (W + s B A)^T + b``: one GEMM with an
effective weight that costs ``r * in * out`` to build — tiny next to the ``N * in * out`` GEMM when
the batch has many tokens. Autograd through that form would compute the full weight gradient
``dY^T x``, so the op has its own backward using the low-rank structure:

* ``dx = dY (W + s B A)`` — one GEMM, instead of the base's ``dx`` plus the branch's plus an add;
* ``dB = s dY^T (x A^T)`` and ``dA = s (dY B)^T x`` — the same small GEMMs as before.

Per site that saves two small GEMMs and two elementwise passes over the activations, in forward
and backward — but building the effective weight is itself a pass over ``in * out`` elements, so
it pays only for many tokens. A fused site is therefore a call of :func:`lora_linear_or_branch`,
which decides per call from the rows it is given (:func:`fusion_pays`): a one-token decode step
runs the canonical graph's own ops, a training batch of thousands of tokens the one GEMM.
Like sibling fusion this is an *execution* rewrite, applied to the copy of the graph
:class:`~graphlora.LoraModel` runs, never to the canonical graph. Sites with LoRA dropout are left
alone (dropout applies to the branch's input only, which the effective weight cannot express),
and so are mixed-precision branches (float32 factors on a half-precision base), whose base and
delta are computed in different dtypes.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphlora.branches import LoraBranch, find_branches
from graphlora.passes.base import GraphPass, PassResult

aten = torch.ops.aten


#: The cost model behind :func:`fusion_pays`, in units of one GEMM multiply-add: a pass over
#: memory costs far more per element than a GEMM (which reuses each element from cache). Fitted
#: on one CPU to ``benchmarks/bench_fusion.py`` and kept on the side of not fusing: near the
#: break-even point both forms cost the same, far below it the effective weight costs up to 9x
#: the branch (one token, 768 x 2048). With 150 a 4 x 512-token forward fused its 768 x 768
#: sites and ran 1.045x the canonical graph; 250 moves that break-even to ~2800 rows.
WEIGHT_PASS_COST = 250.0
ACTIVATION_PASS_COST = 40.0


def fusion_pays(rows: int, in_features: int, out_features: int, rank: int) -> bool:
    """Whether one GEMM with ``W + s B A`` costs less than the base GEMM plus the branch.

    The effective weight costs a rank-``r`` product and a pass over the ``in x out`` weight; the
    branch costs two thin GEMMs and a pass (scale, add) over the ``rows x out`` output. So the
    effective weight pays when ``rows`` is large next to ``in * out * (r + Cw) / (r (in + out) + Ca out)``:
    ~2800 rows for a 768 x 768 projection, ~3300 for 768 x 2048, ~5500 for 2048 x 768 (r = 16)."""
    saved = rows * (rank * (in_features + out_features) + ACTIVATION_PASS_COST * out_features)
    spent = in_features * out_features * (rank + WEIGHT_PASS_COST)
    return saved > spent


def token_rows(x: torch.Tensor) -> int:
    """The rows a linear sees in ``x`` (every dimension but the last): what fusion decides on."""
    return x.numel() // max(1, x.shape[-1])


@torch.library.custom_op("graphlora::lora_linear", mutates_args=())
def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``linear(x, weight, bias) + scale * linear(linear(x, lora_a), lora_b)``, in one GEMM."""
    effective = _effective_weight(weight, lora_a, lora_b, scale)
    return torch.nn.functional.linear(x, effective, bias)


LORA_LINEAR = torch.ops.graphlora.lora_linear.default


def lora_linear_or_branch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    always: bool = False,
) -> torch.Tensor:
    """What a fused site runs: ``graphlora::lora_linear`` where the effective weight pays for this
    call's rows (:func:`fusion_pays`) or ``always``, else the canonical graph's own ops with
    autograd's own backward, so a few-token call costs what the canonical graph costs (not even
    an op dispatch more). A plain function, not an op: the choice is made per call, eagerly."""
    if always or fusion_pays(token_rows(x), weight.shape[1], weight.shape[0], lora_a.shape[0]):
        return LORA_LINEAR(x, weight, bias, lora_a, lora_b, scale)
    linear = torch.nn.functional.linear
    return linear(x, weight, bias) + scale * linear(linear(x, lora_a), lora_b)


def _effective_weight(weight, lora_a, lora_b, scale):
    """``W + scale B A`` in ``W``'s memory layout: a Conv1D weight read transposed stays so, and
    the GEMM sums as the model's own op did (bit for bit while B = 0)."""
    if weight.dim() == 2 and weight.stride(0) == 1 and weight.stride(1) != 1:
        return torch.addmm(weight.t(), lora_a.t(), lora_b.t(), alpha=scale).t()
    return torch.addmm(weight, lora_b, lora_a, alpha=scale)


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, _, lora_a, lora_b, scale = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b)
    ctx.scale = scale


def _backward(ctx, grad):
    x, weight, lora_a, lora_b = ctx.saved_tensors
    s = ctx.scale
    need_x, _, need_bias, need_a, need_b, _ = ctx.needs_input_grad
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dx = dbias = da = db = None
    if need_x:
        dx = (g2 @ _effective_weight(weight, lora_a, lora_b, s)).reshape(x.shape)
    if need_bias:
        dbias = g2.sum(0)
    if need_b:
        db = (g2.t() @ (x2 @ lora_a.t())) * s
    if need_a:
        da = ((g2 @ lora_b).t() @ x2) * s
    return dx, None, dbias, da, db, None


lora_linear.register_autograd(_backward, setup_context=_setup)


def _fusable(br: LoraBranch) -> bool:
    """A standard branch straight on an ``aten.linear`` site: nothing between its ops (no dropout,
    no quantizer), it alone reads the site's output, and it reads the site's own input."""
    base, a, scale, b = br.site.node, br.a, br.scale, br.b
    if br.dora:
        return False  # DoRA rescales the base output per row: not W + s B A (its canonical ops run)
    if not br.standard or scale is None or br.dropout is not None or br.mixed_precision:
        return False  # (float32 factors on a bf16 base: one effective weight has no one dtype)
    if br.add.args[1] is not b or b.args[0] is not scale or scale.args[0] is not a:
        return False
    if not isinstance(scale.args[1], float):
        return False
    if br.add.args[0] is not base or base.target != aten.linear.default or base.kwargs:
        return False
    if a.args[0] is not base.args[0]:
        return False  # quantization on the branch input
    return all(len(n.users) == 1 for n in (a, scale, b, base))


class FuseLoraLinearPass(GraphPass):
    """Replace ``base linear + LoRA branch + add`` by one :func:`lora_linear_or_branch` call
    (``always``: fused at every size)."""

    def __init__(self, always: bool = False) -> None:
        super().__init__()
        self.always = always

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for br in find_branches(gm):
            if not _fusable(br):
                continue
            base, add = br.site.node, br.add
            x, weight = base.args[0], base.args[1]
            bias = base.args[2] if len(base.args) > 2 else None
            with gm.graph.inserting_before(add):
                fused = gm.graph.call_function(
                    lora_linear_or_branch,
                    (x, weight, bias, br.a.args[1], br.b.args[1], br.scale.args[1], self.always),
                )
            fused.meta.update(add.meta)
            add.replace_all_uses_with(fused)
            for n in (add, br.b, br.scale, br.a, base):
                gm.graph.erase_node(n)
            modified = True
        return PassResult(gm, modified)
