"""LoRA initialisations that read the base weight: PiSSA, OLoRA and LoftQ, as tensor math.

Why they exist: kaiming/gaussian start with ``B = 0`` and leave the base alone. These three start
the adapter *inside* the weight. PiSSA and OLoRA move the weight's leading subspace (singular
vectors, or the first columns of a QR factorisation) into ``A``/``B`` and keep the rest as the
base (the residual ``W - scale * B @ A``), so the model computes what it did before but training
moves the directions that matter most. LoftQ picks the base's quantized codes and ``A``/``B``
together so that ``dequant(Q) + scale * B @ A`` is closer to the float ``W`` than ``dequant(Q)``
alone: QLoRA's quantization error is partly undone before the first step.

Every function here takes a weight as ``(out, in)`` float32 and returns ``A`` ``(rank, in)``,
``B`` ``(out, rank)`` and the new base, in the conventions of PEFT 0.21's ``pissa_init``,
``olora_init`` and ``peft.utils.loftq_utils.loftq_init`` (formulas carried over, code our own).
LoftQ here divides the singular values by ``scale`` like PiSSA does, so ``scale * B @ A`` is the
low-rank fit for any alpha; PEFT's LoftQ leaves them undivided, which is the same at
``alpha == rank`` (scale 1) only.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

#: Inits that compute A and B from the base weight and change the base (PEFT's strings).
BASE_INITS = ("pissa", "olora", "loftq")
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


def is_base_init(init: str) -> bool:
    """True for an init that reads and changes the base weight (``pissa``, ``pissa_niter_K``,
    ``olora``, ``loftq``)."""
    return init in BASE_INITS or pissa_niter(init) is not None


def pissa_niter(init: str) -> int | None:
    """K of PEFT's ``"pissa_niter_K"`` (fast randomized SVD with K subspace iterations), else None."""
    match = _PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


def _check(weight: torch.Tensor, rank: int, what: str) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"{what} needs a 2-D weight, got shape {tuple(weight.shape)}")
    if rank > min(weight.shape):
        raise ValueError(f"{what}: rank {rank} exceeds min(out, in) = {min(weight.shape)} of a "
                         f"{tuple(weight.shape)} weight; lower the rank")
    return weight.detach().to(torch.float32)


def pissa(weight: torch.Tensor, rank: int, scale: float, niter: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: ``W = U S Vh``; ``A = sqrt(S_r / scale) Vh_r``, ``B = U_r sqrt(S_r / scale)``;
    base ``W - scale * B @ A`` (the minor singular components). ``niter``: torch's randomized
    ``svd_lowrank`` with that many subspace iterations (PEFT's ``pissa_niter_K``; random, so
    only the full SVD is reproducible)."""
    w = _check(weight, rank, "PiSSA")
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, v = torch.svd_lowrank(w, q=rank, niter=niter)
        vh = v.t()
    root = torch.sqrt(s / scale)
    a = torch.diag(root) @ vh
    b = u @ torch.diag(root)
    return a, b, w - scale * b @ a


def olora(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA: ``W = Q R``; ``A = R[:rank]``, ``B = Q[:, :rank]``; base ``W - scale * B @ A``."""
    w = _check(weight, rank, "OLoRA")
    q, r = torch.linalg.qr(w)
    a, b = r[:rank].contiguous(), q[:, :rank].contiguous()
    return a, b, w - scale * b @ a


def low_rank(residual: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B with ``scale * B @ A`` the best rank-``rank`` fit of ``residual`` (truncated SVD, the
    singular values split evenly between the factors as LoftQ does)."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(s[:rank] / scale)
    return torch.diag(root) @ vh[:rank], u[:, :rank] @ torch.diag(root)


def loftq(weight: torch.Tensor, rank: int, scale: float, iterations: int,
          quant_dequant: Callable[[torch.Tensor], torch.Tensor]
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's alternation: ``Q = quant(W - scale * B @ A)``, then ``A, B`` from the SVD of
    ``W - dequant(Q)``, ``iterations`` times (``B @ A = 0`` before the first).

    ``quant_dequant`` is the base's own quantizer (the rule's encoding, computed on its input,
    and its dequantization). Returns ``A``, ``B`` and the float tensor whose quantization is the
    final ``Q``: the caller stores it as the base weight for the quantization pass, which then
    reproduces ``Q`` exactly.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"LoftQ needs iterations >= 1, got {iterations!r}")
    w = _check(weight, rank, "LoftQ")
    target = w
    for step in range(iterations):
        a, b = low_rank(w - quant_dequant(target), rank, scale)
        if step + 1 < iterations:
            target = w - scale * b @ a
    return a, b, target
