"""SeqMSE and AdaRound: data-driven weight encodings from a layer's input Hessian.

Both minimise the error of the layer's *output* rather than of its weight. For a linear layer
with inputs ``X`` (``n x in``) and weight error ``Δ = W - Ŵ`` (``out x in``), the output error
is ``||X Δ^T||² = Σ_o Δ_o H Δ_o^T`` with ``H = X^T X`` — so the Hessian that GPTQ collects (the
same sequential pass over the data: each layer sees the inputs of the layers before it already
quantized) is all either needs.

* **SeqMSE** (AIMET's ``apply_seq_mse``): for each output channel and block, try ``candidates``
  clipping ratios of the range (1.0 down to ``min_ratio``, as :func:`calibrate_weight`'s mse) and
  keep the one whose *output* error ``Δ_ob H_bb Δ_ob^T`` is lowest (``H_bb``: the block's diagonal
  block of ``H``; cross-block terms are left out, as AIMET does, which keeps blocks independent).
  Per channel it is the exact output error. Codes are round-to-nearest on the chosen scales.
* **AdaRound** (Nagel et al., 2020, "Up or Down? Adaptive Rounding for Post-Training
  Quantization"): keep a data-free encoding's scales and learn, per weight, whether to round
  down or up: ``Ŵ = s · clamp(floor(W / s) + h(V))`` with the rectified sigmoid
  ``h(V) = clamp(sigmoid(V) (ζ - γ) + γ, 0, 1)`` (ζ = 1.1, γ = -0.1), minimising
  ``tr(Δ H Δ^T) / tr(W H W^T) + λ Σ (1 - |2 h(V) - 1|^β)`` with Adam, ``β`` annealed from 20 to 2
  after a warm-up in which the regulariser is off; at the end ``h(V)`` is rounded to 0 or 1. The
  reconstruction term is normalised so ``λ`` (0.01, AIMET's default) does not depend on the
  layer's scale.

Both return a :class:`~graphlora.quant.gptq.GPTQResult` (weight on the grid, codes, encoding), so
the graph pass installs them exactly as GPTQ's.
"""

from __future__ import annotations

import math

import torch

from graphlora.errors import QuantizationError
from graphlora.quant import affine
from graphlora.quant.gptq import GPTQResult, single_thread
from graphlora.quant.qtypes import QType, check_qtype_use, resolve_grid
from graphlora.quant.weight_calibration import (
    build_encoding,
    check_finite,
    group_params,
    group_ranges,
    grouped,
    params_from_range,
    qdq,
    resolve_symmetric,
)


def _setup(w, hessian, qtype, axis, block_size, method, symmetric, grid, name):
    qt = check_qtype_use(qtype, "weight")
    if qt.kind != "int":
        raise QuantizationError(f"{name or 'weight'}: SeqMSE/AdaRound need an integer qtype, not {qt.name}")
    if w.dim() != 2:
        raise QuantizationError(f"{name or 'weight'}: needs a 2-D weight, got shape {tuple(w.shape)}")
    check_finite(w, name)
    check_finite(hessian, name, what="Hessian of")
    axis = axis % 2
    sym = resolve_symmetric(qt, method, symmetric)
    qt = resolve_grid(qtype, grid, sym)
    canon = affine.to_canonical(w.detach().to(torch.float32), axis)  # (C, K)
    k = canon.shape[1]
    if tuple(hessian.shape) != (k, k):
        raise QuantizationError(f"{name or 'weight'}: Hessian shape {tuple(hessian.shape)} does not "
                                f"match the weight's {k} input features")
    return qt, sym, axis, canon, hessian.to(torch.float32)


def _blocks(k: int, block_size: int | None) -> list[slice]:
    step = k if block_size is None else block_size
    return [slice(i, min(i + step, k)) for i in range(0, k, step)]


def _finish(qt, scale, zp, w, canon_q, axis, block_size, sym, name) -> GPTQResult:
    enc = build_encoding(qt, scale, zp, tuple(w.shape), axis, block_size, sym, name=name)
    weight = affine.from_canonical(canon_q, tuple(w.shape), axis)
    codes = enc.quantize(weight)
    return GPTQResult(weight, codes, enc, 0.0)


# ------------------------------------------------------------------------------------------ SeqMSE
def seqmse_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    qtype: str | QType = "int4",
    *,
    axis: int = 0,
    block_size: int | None = None,
    symmetric: bool | None = None,
    scale_dtype: torch.dtype = torch.float32,
    candidates: int = 100,
    min_ratio: float = 0.5,
    grid: str | None = None,
    name: str | None = None,
) -> GPTQResult:
    """SeqMSE: per channel/block, the clipping ratio minimising the layer's output error."""
    qt, sym, axis, canon, h = _setup(w, hessian, qtype, axis, block_size, "mse", symmetric, grid, name)
    c, k = canon.shape
    xg = grouped(canon, 0, block_size)  # (C, G, g), zero-padded: padding adds no error
    g_count, g = xg.shape[1], xg.shape[2]
    hb = torch.zeros(g_count, g, g)  # the diagonal blocks of H, zero-padded like the weight
    for b, sl in enumerate(_blocks(k, block_size)):
        n = sl.stop - sl.start
        hb[b, :n, :n] = h[sl, sl]
    lo, hi = group_ranges(xg, sym, qt)
    best_err = torch.full((c, g_count), float("inf"))
    best_scale = best_zp = None
    for r in torch.linspace(1.0, min_ratio, candidates):
        scale, zp = params_from_range(lo * r, hi * r, qt, sym, scale_dtype)  # (C, G)
        z = None if zp is None else zp.unsqueeze(-1)
        delta = xg - qdq(xg, qt, scale.unsqueeze(-1), z)
        err = torch.einsum("cgi,gij,cgj->cg", delta, hb, delta)  # output error per channel, block
        better = err < best_err  # ties keep the wider range
        best_err = torch.where(better, err, best_err)
        best_scale = scale if best_scale is None else torch.where(better, scale, best_scale)
        if zp is not None:
            best_zp = zp if best_zp is None else torch.where(better, zp, best_zp)
    z = None if best_zp is None else best_zp.unsqueeze(-1)
    canon_q = qdq(xg, qt, best_scale.unsqueeze(-1), z).reshape(c, -1)[:, :k]
    return _finish(qt, best_scale, best_zp, w, canon_q, axis, block_size, sym, name)


def _expand(p: torch.Tensor, blocks: list[slice], k: int) -> torch.Tensor:
    """(C, G) block parameters -> (C, K) per element."""
    out = torch.empty(p.shape[0], k, dtype=p.dtype)
    for b, sl in enumerate(blocks):
        out[:, sl] = p[:, b:b + 1]
    return out


# ------------------------------------------------------------------------------------------ AdaRound
ZETA, GAMMA = 1.1, -0.1


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _factor(h: torch.Tensor, energy: float) -> torch.Tensor:
    """``F`` (K x r) with ``F F^T`` the best rank-r approximation of ``H`` holding ``energy`` of
    its trace."""
    evals, evecs = torch.linalg.eigh(h.to(torch.float64))
    evals = evals.clamp_min(0.0).flip(0)
    evecs = evecs.flip(1)
    total = float(evals.sum())
    if total <= 0:
        return torch.zeros(h.shape[0], 1)
    r = int(torch.searchsorted(torch.cumsum(evals, 0) / total, torch.tensor(min(energy, 1.0), dtype=torch.float64))) + 1
    r = min(r, h.shape[0])
    return (evecs[:, :r] * evals[:r].sqrt()).to(torch.float32)


def adaround_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    qtype: str | QType = "int4",
    *,
    axis: int = 0,
    block_size: int | None = None,
    symmetric: bool | None = None,
    scale_dtype: torch.dtype = torch.float32,
    init_method: str = "mse",
    iterations: int = 500,
    lr: float = 1e-2,
    reg_weight: float = 0.01,
    warmup: float = 0.2,
    beta_range: tuple[float, float] = (20.0, 2.0),
    energy: float = 0.999,
    grid: str | None = None,
    name: str | None = None,
) -> GPTQResult:
    """AdaRound on the scales of ``init_method`` (``absmax``/``minmax``/``mse``). The
    reconstruction term runs on the eigen-directions of ``H`` holding ``energy`` of its trace
    (``energy=1``: all of them), which keeps an iteration at ``out x in x r`` operations."""
    qt, sym, axis, canon, h = _setup(w, hessian, qtype, axis, block_size, init_method, symmetric, grid, name)
    c, k = canon.shape
    xg = grouped(canon, 0, block_size)
    scale, zp = group_params(xg, qt, init_method, sym, scale_dtype)
    blocks = _blocks(k, block_size)
    s = _expand(scale.float(), blocks, k)
    z = None if zp is None else _expand(zp.float(), blocks, k)
    lo_code, hi_code = float(qt.qmin), float(qt.qmax)
    base = torch.floor(canon / s)
    rest = canon / s - base  # in [0, 1): where W lies between its two neighbouring codes
    # V starts where h(V) equals that fraction (AdaRound's initialisation): the soft weight is W
    init = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    v = torch.log(init / (1 - init)).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    f = _factor(h, energy)  # (K, r): Δ H Δ^T = ||Δ F||² up to the dropped eigen-directions
    norm = float((canon @ f).pow(2).sum()) or 1.0
    shift = 0.0 if z is None else z

    def soft_weight(hv):
        q = (base + hv + shift).clamp(lo_code, hi_code) - shift
        return q * s

    warm = int(warmup * iterations)
    # hundreds of small steps: one thread avoids the wake-up cost of several (as in GPTQ's sweep)
    with torch.enable_grad(), single_thread():
        for it in range(iterations):
            hv = _rectified_sigmoid(v)
            rec = ((canon - soft_weight(hv)) @ f).pow(2).sum() / norm
            if it < warm:
                loss = rec
            else:
                t = (it - warm) / max(1, iterations - warm)
                beta = beta_range[1] + 0.5 * (beta_range[0] - beta_range[1]) * (1 + math.cos(math.pi * t))
                loss = rec + reg_weight * (1 - (2 * hv - 1).abs().pow(beta)).sum() / hv.numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        hard = (_rectified_sigmoid(v) >= 0.5).to(torch.float32)
        canon_q = soft_weight(hard)
    return _finish(qt, scale, zp, w, canon_q, axis, block_size, sym, name)
