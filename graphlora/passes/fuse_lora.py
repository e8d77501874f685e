"""Fuse a linear site and its LoRA branch into one op with a hand-written backward.

``y = x W^T + b + s (x A^T) B^T`` is, for the forward, ``x (W + s B A)^T + b``: one GEMM with an
effective weight that costs ``r * in * out`` to build — tiny next to the ``N * in * out`` GEMM when
the batch has many tokens. Autograd through that form would compute the full weight gradient
``dY^T x``, so the op has its own backward using the low-rank structure:

* ``dx = dY (W + s B A)`` — one GEMM, instead of the base's ``dx`` plus the branch's plus an add;
* ``dB = s dY^T (x A^T)`` and ``dA = s (dY B)^T x`` — the same small GEMMs as before.

Per site that saves two small GEMMs and two elementwise passes over the activations, in forward
and backward. Like sibling fusion this is an *execution* rewrite, applied to the copy of the graph
:class:`~graphlora.LoraModel` runs, never to the canonical graph. Sites with LoRA dropout are left
alone (dropout applies to the branch's input only, which the effective weight cannot express),
and so are mixed-precision branches (float32 factors on a half-precision base), whose base and
delta are computed in different dtypes.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphlora import meta
from graphlora.branches import LoraBranch, find_branches
from graphlora.passes.base import GraphPass, PassResult

aten = torch.ops.aten


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
        effective = _effective_weight(weight, lora_a, lora_b, s)
        dx = (g2 @ effective).reshape(x.shape)
    if need_bias:
        dbias = g2.sum(0)
    if need_b:
        db = (g2.t() @ (x2 @ lora_a.t())) * s
    if need_a:
        da = ((g2 @ lora_b).t() @ x2) * s
    return dx, None, dbias, da, db, None


lora_linear.register_autograd(_backward, setup_context=_setup)


def reads_dequantized(weight) -> bool:
    """Whether a linear's weight operand is rebuilt from quantized codes on every call (a
    ``graphlora::dequantize*`` node, possibly behind a transpose or cast). Fusing such a site
    would add a full pass over the freshly dequantized weight per call (the effective weight
    ``W + s B A``, or the concatenation of siblings) on top of the GEMM it feeds, which at decode
    sizes costs as much as the GEMM: quantized sites run unfused."""
    node = weight
    for _ in range(4):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return False
        if meta.role(node) == "dequant":
            return True
        inputs = node.all_input_nodes
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return False


def _fusable(br: LoraBranch) -> bool:
    """A standard branch straight on an ``aten.linear`` site: nothing between its ops (no dropout,
    no quantizer), it alone reads the site's output, and it reads the site's own input."""
    base, a, scale, b = br.site.node, br.a, br.scale, br.b
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
    if reads_dequantized(base.args[1]):
        return False
    return all(len(n.users) == 1 for n in (a, scale, b, base))


class FuseLoraLinearPass(GraphPass):
    """Replace ``base linear + LoRA branch + add`` by one ``graphlora::lora_linear`` node."""

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
                    torch.ops.graphlora.lora_linear.default,
                    (x, weight, bias, br.a.args[1], br.b.args[1], br.scale.args[1]),
                )
            fused.meta.update(add.meta)
            add.replace_all_uses_with(fused)
            for n in (add, br.b, br.scale, br.a, base):
                gm.graph.erase_node(n)
            modified = True
        return PassResult(gm, modified)
