"""Helpers for the ONNX tests (no tests here): quantized graphs built by hand with FX surgery.

They produce the graph form the quantization passes contract for — packed storage read through
one ``graphlora::dequantize*`` node, ``graphlora::fake_quantize`` on activations and LoRA weights,
or a float base on the grid with a ``weight_encoding`` — using only :class:`Encoding`, so the
export tests do not depend on how (or when) those passes are implemented.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx

from graphlora import meta
from graphlora.branches import find_branches
from graphlora.graph_utils import remove_dead_nodes, set_tensor
from graphlora.passes.quantize_weights import install_encoding
from graphlora.quant import Encoding, calibrate_weight, get_qtype
from graphlora.quant.affine import affine_params_from_range
from graphlora.quant.ops import OPS
from graphlora.sites import tagged_sites


def groups(gm):
    out = {}
    for site in tagged_sites(gm):
        out.setdefault(site.spec.weight_name, []).append(site)
    return out


def quantize_weights(lm, qtype: str, group_size: int | None = None, *, method: str = "absmax",
                     storage: str = "packed", scale_dtype=None, double_quant: bool = False):
    """Quantize every site's base weight (packed storage, or float on the grid + encoding)."""
    gm = lm.graph_module
    qt = get_qtype(qtype)
    if scale_dtype is None:
        scale_dtype = torch.float16 if qt.packed and not double_quant else torch.float32
    for name, sites in groups(gm).items():
        w = sites[0].param_value().detach().float()
        axis = 0 if sites[0].spec.param_layout == "out_in" else 1
        enc = calibrate_weight(w, qtype, method=method, axis=axis, block_size=group_size,
                               scale_dtype=scale_dtype, double_quant=double_quant, name=name)
        if storage == "packed":
            install_encoding(gm, sites, enc, "packed", weight=w)
            for s in sites:
                meta.tag(s.node, "base", weight_qtype=qt.name)
        else:
            on_grid = enc.dequantize(enc.quantize(w))
            qual = f"{name}__on_grid"
            set_tensor(gm, qual, torch.nn.Parameter(on_grid, requires_grad=False), parameter=True)
            for s in sites:
                with gm.graph.inserting_before(s.node):
                    read = gm.graph.get_attr(qual)
                s.feed_param(read)
                meta.tag(s.node, "base", weight_encoding=enc)
    remove_dead_nodes(gm)
    gm.graph.lint()
    gm.recompile()
    return lm


class _Recorder(fx.Interpreter):
    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted = wanted
        self.ranges = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted and isinstance(out, torch.Tensor):
            lo, hi = float(out.min()), float(out.max())
            old = self.ranges.get(n)
            self.ranges[n] = (min(lo, old[0]), max(hi, old[1])) if old else (lo, hi)
        return out


def _insert_fq(gm, value: fx.Node, users, enc: Encoding, name: str, **tags) -> fx.Node:
    q = enc.qtype
    s_name, z_name = f"graphlora_quant.act.{name}.scale", f"graphlora_quant.act.{name}.zero_point"
    set_tensor(gm, s_name, enc.scale, parameter=False)
    zp = enc.zero_point
    if zp is not None:
        set_tensor(gm, z_name, zp, parameter=False)
    first = min(users, key=lambda u: list(gm.graph.nodes).index(u))
    with gm.graph.inserting_before(first):
        s = gm.graph.get_attr(s_name)
        z = gm.graph.get_attr(z_name) if zp is not None else None
        fq = gm.graph.call_function(OPS["fake_quantize"], (value, s, z, None, None, q.qmin, q.qmax))
    meta.tag(fq, "fake_quant", tensor=name, qtype=q.name, encoding=enc, **tags)
    for u in users:
        u.replace_input_with(value, fq)
    return fq


def quantize_activations(lm, qtype: str, batches, *, symmetric: bool = False, branch_reads_quantized=True):
    """Calibrated per-tensor fake-quant on every site's input (min/max over ``batches``)."""
    gm = lm.graph_module
    qt = get_qtype(qtype)
    sites = tagged_sites(gm)
    inputs = {s.input for s in sites}
    rec = _Recorder(gm, inputs)
    with torch.no_grad():
        for b in batches:
            if isinstance(b, dict):
                rec.run(*[b[p.target] for p in gm.graph.nodes if p.op == "placeholder" and p.target in b])
            else:
                rec.run(*b)
    branches = find_branches(gm)
    done = {}
    for site in sites:
        x = site.input
        if x in done:
            site.node.replace_input_with(x, done[x])
            continue
        lo, hi = rec.ranges[x]
        scale, zp = affine_params_from_range(torch.tensor(lo), torch.tensor(hi), qmin=qt.qmin,
                                             qmax=qt.qmax, signed=qt.signed, symmetric=symmetric)
        enc = Encoding(qt, scale, zp, symmetric=symmetric, name=f"{site.module_path}.input")
        users = [site.node]
        if branch_reads_quantized:
            users += [n for br in branches for n in br.nodes if x in n.all_input_nodes
                      and br.add.args[0] is site.node]
        done[x] = _insert_fq(gm, x, users, enc, f"{site.module_path}.input",
                             module_path=site.module_path)
    gm.graph.lint()
    gm.recompile()
    return lm


def quantize_lora_weights(lm, qtype: str = "int8"):
    """Symmetric per-output-channel fake-quant on every LoRA A/B weight (axis 0)."""
    gm = lm.graph_module
    qt = get_qtype(qtype)
    for br in find_branches(gm):
        for node in (br.a, br.b):
            w_node = node.args[1]
            if meta.role(w_node) == "fake_quant":
                continue
            w = getattr_path(gm, w_node.target).detach().float()
            enc = calibrate_weight(w, qtype, method="absmax", axis=0, name=w_node.target)
            s_name = f"graphlora_quant.lora.{w_node.target}.scale"
            set_tensor(gm, s_name, enc.scale, parameter=False)
            with gm.graph.inserting_before(node):
                s = gm.graph.get_attr(s_name)
                fq = gm.graph.call_function(OPS["fake_quantize"], (w_node, s, None, 0, None, qt.qmin, qt.qmax))
            meta.tag(fq, "fake_quant", tensor=w_node.target, qtype=qt.name, encoding=enc,
                     module_path=br.module_path, adapter=br.adapter)
            meta.tag(s, "weight", module_path=br.module_path, adapter=br.adapter)
            node.replace_input_with(w_node, fq)
    gm.graph.lint()
    gm.recompile()
    return lm


def getattr_path(root, qual):
    obj = root
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def randomize_lora(lm, std: float = 0.05, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return lm


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


def _int8_products_saturate() -> bool:
    """True on an x86 CPU without VNNI (AVX2 only, e.g. some AMD EPYC): onnxruntime's u8 x s8
    GEMM there sums pairs of products with ``vpmaddubsw``, which saturates at int16, so its int8
    kernels differ from exact integer arithmetic by up to a few 1e-3 of the output's scale
    (onnxruntime's quantization docs name this AVX2 saturation). CPUs with VNNI (or ARM) are exact."""
    import platform
    from pathlib import Path

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return not any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


#: onnxruntime's int8 kernels saturate on this CPU (see _int8_products_saturate)
INT8_SATURATES = _int8_products_saturate()
#: the int8 bound against PyTorch: exact-arithmetic CPUs 1e-4; saturating ones 5e-3 (measured there:
#: 2.2e-3 on a tiny BERT, 2026-12-02)
INT8_BOUND = 5e-3 if INT8_SATURATES else 1e-4
