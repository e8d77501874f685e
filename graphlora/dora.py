"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``) as tensor math: the one place its
formulas live, read by branch insertion, merging and the checkpoint code.

A DoRA site computes, with ``W`` the base weight ``(out, in)`` (dequantized for a quantized
base), ``s`` the LoRA scale and ``m`` the trainable magnitude ``(out,)``::

    n   = || W + s B A ||  per output row, detached (no gradient flows through the norm)
    y   = base(x) + (m / n - 1) * (x W^T) + (m / n) * s B A x

that is ``y = (m / n) * (x (W + s B A)^T) + bias``: the bias is left out of the rescaled part,
as PEFT does. With LoRA dropout the rescaled base term reads the dropped-out input. The
magnitude starts at ``||W||`` per row, so while ``B = 0`` the site computes what it did. The
merged weight is ``(m / n)[:, None] * (W + s B A)``.
"""

from __future__ import annotations

import torch

from graphlora.io.peft_format import MAGNITUDE_KEY
from graphlora.sites import Layout

#: The name of the magnitude next to ``lora_A``/``lora_B``: PEFT's attribute name, which is also
#: its key in adapter files (one name, kept by the file format).
MAGNITUDE = MAGNITUDE_KEY


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """``||W_i||`` of each output row of an ``(out, in)`` weight, float32: the magnitude's start."""
    return torch.linalg.vector_norm(weight.detach().float(), dim=1)


def dora_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                magnitude: torch.Tensor) -> torch.Tensor:
    """The merged DoRA weight ``(m / ||W + s B A||)[:, None] * (W + s B A)``, float32, ``(out, in)``."""
    full = weight.detach().float() + scale * (b.detach().float() @ a.detach().float())
    return (magnitude.detach().float() / torch.linalg.vector_norm(full, dim=1))[:, None] * full


def dora_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
               magnitude: torch.Tensor, param_layout: Layout) -> torch.Tensor:
    """What a DoRA adapter adds to the base weight when merged (the merged weight minus ``W``),
    float32, laid out as the parameter is stored (``weight`` given in that layout too)."""
    w = weight if param_layout == "out_in" else weight.t()
    delta = dora_weight(w, a, b, scale, magnitude) - w.detach().float()
    return delta if param_layout == "out_in" else delta.t()
