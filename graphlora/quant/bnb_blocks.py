"""NF4 blocks as onnxruntime's ``MatMulBnb4`` (bitsandbytes' layout) can hold them.

``MatMulBnb4`` reads an ``(N, K)`` NF4 code matrix in blocks of 16..256 codes over the flattened
matrix, one float32 absmax each. graphlora's NF4 encodings are more general: any group size along
K (the last group of a row may be shorter), one absmax per row, or one per tensor. Every one whose
group covers a whole row, or whose group size a MatMulBnb4 block divides, maps exactly: a block
``b`` dividing the group repeats the group's absmax once per ``b`` codes, and a row that ``b``
does not divide is padded (codes of 0.0, zeros in the activation) to a length it does. Only a
group shorter than a row and not a multiple of 16 has no such form.

The ONNX lowering uses :func:`bnb_layout` / :func:`bnb_absmax`; rule matching uses
:func:`bnb_block_problem` to refuse, at transform time, what the lowering could not export.
"""

from __future__ import annotations

import torch

__all__ = ["BNB_BLOCKS", "NF4_ZERO_CODE", "bnb_absmax", "bnb_block_problem", "bnb_codes", "bnb_layout"]

#: onnxruntime's MatMulBnb4 block sizes, largest first.
BNB_BLOCKS = (256, 128, 64, 32, 16)
#: The NF4 code of 0.0 (``NF4_CODEBOOK[7]``): what padded codes hold.
NF4_ZERO_CODE = 7


def bnb_block_problem(group_size: int | None, in_features: int) -> str | None:
    """Why NF4 groups of ``group_size`` along ``in_features`` have no MatMulBnb4 form, or None."""
    if group_size is None or group_size >= in_features:
        return None
    if any(group_size % b == 0 for b in BNB_BLOCKS):
        return None
    return (
        f"NF4 group_size {group_size} over {in_features} input features has no ONNX form: "
        f"onnxruntime's MatMulBnb4 (the only kernel that reads NF4) needs blocks of "
        f"{'/'.join(map(str, reversed(BNB_BLOCKS)))} codes that divide the group; use a "
        "group_size that is a multiple of 16 (QLoRA uses 64), or None (one absmax per output channel)"
    )


def bnb_layout(group_size: int | None, in_features: int) -> tuple[int, int]:
    """``(block, padded K)``: the MatMulBnb4 block re-expressing groups of ``group_size``
    (``None``: one per row) over rows of ``in_features``, and the row length padded to a
    multiple of it; the least padding first, then the largest block."""
    k = in_features
    group = k if group_size is None else min(group_size, k)
    problem = bnb_block_problem(group, k)
    if problem is not None:
        raise ValueError(problem)
    fits = [b for b in BNB_BLOCKS if group % b == 0] if group < k else list(BNB_BLOCKS)
    return min(((b, -(-k // b) * b) for b in fits), key=lambda bk: (bk[1], -bk[0]))


def bnb_absmax(absmax: torch.Tensor, rows: int, group_size: int | None, in_features: int) -> torch.Tensor:
    """The float32 absmax MatMulBnb4 reads, ``(rows * padded K / block,)``, from graphlora's:
    ``(rows, n_groups)`` per group, ``(rows,)`` per row or ``()`` per tensor."""
    block, padded_k = bnb_layout(group_size, in_features)
    group = in_features if group_size is None else min(group_size, in_features)
    per_group = absmax.float().reshape(rows, -1) if absmax.dim() else absmax.float().reshape(1, 1).expand(rows, 1)
    index = (torch.arange(0, padded_k, block) // group).clamp(max=per_group.shape[1] - 1)
    return per_group[:, index].contiguous().reshape(-1)


def bnb_codes(codes: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """``(rows, K)`` NF4 codes padded to ``(rows, padded K)`` with the code of 0.0."""
    _, padded_k = bnb_layout(group_size, in_features)
    return torch.nn.functional.pad(codes, (0, padded_k - in_features), value=NF4_ZERO_CODE)
