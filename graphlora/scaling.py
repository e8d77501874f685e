"""The LoRA scale, once: every module that multiplies a branch, merges a delta or writes a PEFT
config computes it here, so graphlora, PEFT's ``scaling`` and the files agree by construction.

``scale = alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA (Kalajdzievski, 2023), which keeps
the update's magnitude stable as the rank grows.
"""

from __future__ import annotations

import math


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """The factor a LoRA branch multiplies ``B @ A`` by."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def alpha_for_scale(scale: float, rank: int, use_rslora: bool) -> float:
    """The alpha that gives ``scale`` at ``rank`` under ``use_rslora`` (the inverse of
    :func:`lora_scale`): PEFT keeps one rsLoRA flag per adapter, so a module whose own flag differs
    is written with the alpha that reproduces its scale."""
    return scale * (math.sqrt(rank) if use_rslora else rank)
