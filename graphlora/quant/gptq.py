"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantize a linear layer's weight one input column at a time and push
each column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of
the layer's reconstruction loss ``||X W^T - X Ŵ^T||²`` (``H = 2 X^T X``).

Steps, as in the paper's Algorithm 1:

1. ``H += λ I`` with ``λ = percdamp * mean(diag H)`` (1% by default); columns never activated
   (``diag H == 0``) get ``H_jj = 1`` and a zero weight.
2. ``U = chol(H⁻¹)`` (upper Cholesky factor of the inverse), computed in float64.
3. For column ``j``: quantize ``w_j`` to ``q_j``, ``e = (w_j - q_j) / U_jj`` and update the
   remaining columns of the current lazy batch ``w_k -= e U_jk``; after each batch of
   ``lazy_batch`` (128) columns, apply the batch's accumulated updates to all later columns at once.
4. Per-group scales are computed when the group's first column is reached, from the weights as
   updated so far. Batches are aligned to whole groups so a group never straddles two batches.

``act_order`` (column permutation) is not implemented.
"""

from __future__ import annotations

import contextlib
import functools

from dataclasses import dataclass

import torch

from graphlora.errors import CalibrationError, QuantizationError
from graphlora.quant import affine
from graphlora.quant.encoding import Encoding
from graphlora.quant.qtypes import QType, check_qtype_use, resolve_grid
from graphlora.quant.weight_calibration import (
    Method,
    build_encoding,
    check_finite,
    group_params,
    qdq,
    resolve_symmetric,
)


@contextlib.contextmanager
def single_thread():
    """Run tiny tensor ops on one thread: with several intra-op threads each op pays a thread
    wake-up and join, which dominated GPTQ's sweep (22.9 s vs 0.48 s for a 384x1536 layer on a
    busy 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _single_threaded(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with single_thread():
            return fn(*args, **kwargs)

    return run


class HessianAccumulator:
    """Accumulates ``X^T X`` of a linear layer's inputs over calibration batches.

    ``add`` takes inputs of any leading shape ``(..., in_features)``. The statistics are plain sums
    (``xtx`` and the row count ``n``), so ranks can all-reduce them with SUM and get exactly the
    single-process result (up to float summation order); :meth:`hessian` returns ``2 X^T X / n``.
    """

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None, name: str | None = None) -> None:
        self.in_features = in_features
        self.name = name
        self.xtx = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise CalibrationError(
                f"Hessian of {self.name or '<unnamed>'}: input has {x.shape[-1]} features, "
                f"expected {self.in_features}")
        x = x.detach().reshape(-1, self.in_features).to(self.xtx.dtype)
        if not torch.isfinite(x).all():
            raise CalibrationError(
                f"Hessian of {self.name or '<unnamed>'}: calibration input contains NaN/Inf")
        self.xtx.addmm_(x.t(), x)
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if int(self.n) == 0:
            raise CalibrationError(
                f"Hessian of {self.name or '<unnamed>'}: no calibration inputs were observed")
        return 2.0 * self.xtx / int(self.n)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"xtx": self.xtx, "n": self.n}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.xtx = state["xtx"].to(self.xtx.dtype).clone()
        self.n = state["n"].to(torch.int64).clone()

    @staticmethod
    def reduce_ops() -> dict[str, str]:
        return {"xtx": "sum", "n": "sum"}

    def merge(self, other: HessianAccumulator) -> None:
        self.xtx += other.xtx.to(self.xtx.dtype)
        self.n += other.n


@dataclass(frozen=True, eq=False)
class GPTQResult:
    """``weight``: the quantized-dequantized weight (original layout, float32), which lies on the
    grid of ``encoding``, so ``encoding.quantize(weight)`` gives ``codes`` back exactly.
    ``loss``: the algorithm's own estimate of the added reconstruction error."""

    weight: torch.Tensor
    codes: torch.Tensor
    encoding: Encoding
    loss: float


def _inverse_hessian_factor(h: torch.Tensor, percdamp: float, name: str | None) -> torch.Tensor:
    h = h.to(torch.float64).clone()
    k = h.shape[0]
    damp = percdamp * torch.mean(torch.diag(h))
    idx = torch.arange(k)
    h[idx, idx] += damp
    try:
        chol = torch.linalg.cholesky(h)
        hinv = torch.cholesky_inverse(chol)
        return torch.linalg.cholesky(hinv, upper=True)
    except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise QuantizationError(
            f"GPTQ for {name or '<unnamed>'}: the damped Hessian is not positive definite; "
            f"raise percdamp (now {percdamp}) or use more calibration data ({exc})") from None


@_single_threaded
def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    qtype: str | QType = "int4",
    *,
    axis: int = 0,
    block_size: int | None = None,
    method: Method = "minmax",
    symmetric: bool | None = None,
    scale_dtype: torch.dtype = torch.float32,
    percdamp: float = 0.01,
    lazy_batch: int = 128,
    name: str | None = None,
    grid: str | None = None,
) -> GPTQResult:
    """Quantize a 2-D weight with GPTQ given the Hessian ``H`` (``in x in``) of its inputs.

    ``axis`` is the output-channel axis (0 for ``(out, in)``, 1 for ``(in, out)``);
    ``block_size`` gives per-group scales along the input axis (None: per-channel). ``method``
    picks each channel's/group's range as in :func:`calibrate_weight` (absmax, minmax or mse),
    ``grid`` its symmetric integer grid (as there).
    Runs on one thread: thousands of tiny ops, where threads only add wake-up costs.
    """

    qt = check_qtype_use(qtype, "weight")
    sym = resolve_symmetric(qt, method, symmetric)
    qt = resolve_grid(qtype, grid, sym)
    if qt.kind == "float8":
        raise QuantizationError("GPTQ supports integer and nf4 qtypes, not fp8")
    if w.dim() != 2:
        raise QuantizationError(f"GPTQ needs a 2-D weight, got shape {tuple(w.shape)} ({name})")
    check_finite(w, name)
    check_finite(hessian, name, what="Hessian of")
    axis = axis % 2
    W = affine.to_canonical(w.detach().to(torch.float32), axis).clone()  # (C, K)
    C, K = W.shape
    if tuple(hessian.shape) != (K, K):
        raise QuantizationError(
            f"GPTQ for {name or '<unnamed>'}: Hessian shape {tuple(hessian.shape)} does not match "
            f"the weight's {K} input features")

    H = hessian.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = _inverse_hessian_factor(H, percdamp, name).to(torch.float32)

    def params(cols: torch.Tensor):
        return group_params(cols.unsqueeze(1), qt, method, sym, scale_dtype)  # (C, 1)

    if block_size is None:
        scale, zp = params(W)
        scales, zps = [scale], [zp]
        batch = lazy_batch
    else:
        scales, zps = [], []
        batch = max(block_size, (lazy_batch // block_size) * block_size)

    return _gptq_columns(W, U, qt, w, axis, block_size, sym, scale_dtype, params, scales, zps, batch, name)


def _gptq_columns(W, U, qt, w, axis, block_size, sym, scale_dtype, params, scales, zps, batch, name) -> GPTQResult:
    """The column-by-column sweep: thousands of tiny ops, run on one thread (see single_thread)."""
    C, K = W.shape
    Q = torch.zeros_like(W)
    losses = torch.zeros(C, dtype=torch.float64)
    for i1 in range(0, K, batch):
        i2 = min(i1 + batch, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if block_size is not None and col % block_size == 0:
                s, z = params(W1[:, i:i + block_size])
                scales.append(s)
                zps.append(z)
            s, z = scales[-1][:, 0], None if zps[-1] is None else zps[-1][:, 0]
            w_col = W1[:, i]
            q_col = qdq(w_col, qt, s, z)
            Q[:, col] = q_col
            d = U1[i, i]
            err = (w_col - q_col) / d
            losses += (err.double() ** 2) / 2
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    scale_all = torch.cat(scales, dim=1)
    zp_all = None if zps[0] is None else torch.cat(zps, dim=1)
    enc = build_encoding(qt, scale_all, zp_all, tuple(w.shape), axis, block_size, sym, name=name)
    weight = affine.from_canonical(Q, tuple(w.shape), axis)
    codes = enc.quantize(weight)
    return GPTQResult(weight, codes, enc, float(losses.sum()))
