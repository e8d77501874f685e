"""Checks for the names, numbers and tensors graphlora takes from callers and reads from files.

Why one module: a value that is wrong in a small way (an adapter called ``"a.b"``, an alpha of
``Infinity`` in someone's ``adapter_config.json``, LoRA factors stored as integers) otherwise
travels far before it breaks — into ``nn.Module`` attribute names, file names, ``float32``
scales, silent casts — and fails there with a raw ``KeyError`` or as NaN outputs. Every loader
and every API that takes such a value calls one of these checks at the door, and each check
raises a :class:`~graphlora.errors.GraphloraError` subclass (the caller picks which) naming the
value and where it came from.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from graphlora.errors import AdapterError, GraphloraError, InputError

__all__ = [
    "FLOAT32_MAX",
    "MAX_ADAPTER_NAME",
    "check_adapter_name",
    "check_count",
    "check_finite",
    "check_lora_alpha",
    "check_lora_factor",
]

#: Longest adapter name: it becomes a directory name (PEFT's layout for several adapters) and an
#: ``nn.Module`` attribute, and file systems limit names to 255 bytes.
MAX_ADAPTER_NAME = 100
#: Largest finite float32: LoRA scales and quantization scales are float32 tensors.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)

_NAME = re.compile(r"\w[\w\-]*")
# Names Windows reserves for devices (in any case, with or without an extension).
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"COM{i}" for i in range(10)] + [f"LPT{i}" for i in range(10)]
)


def check_adapter_name(name: Any, *, where: str = "adapter name", error: type[GraphloraError] = AdapterError) -> str:
    """``name`` if it can name an adapter, else ``error``.

    An adapter name is an attribute of an ``nn.Module`` container in the graph (so no ``.``, no
    name ``nn.Module`` already uses such as ``train`` or ``forward``) and a directory name in
    PEFT's multi-adapter layout (so no path separators, NUL, ``..``, device names Windows
    reserves, or names longer than :data:`MAX_ADAPTER_NAME`): letters, digits, ``_`` and ``-``,
    starting with a letter, digit or ``_``.
    """
    if not isinstance(name, str):
        raise error(f"{where} must be a string, got {type(name).__name__} {name!r}")
    if not name:
        raise error(f"{where} is empty; name the adapter, e.g. 'default'")
    if len(name) > MAX_ADAPTER_NAME:
        raise error(f"{where} {name[:40]!r}... is {len(name)} characters long; the limit is {MAX_ADAPTER_NAME}")
    if not _NAME.fullmatch(name):
        bad = next((c for c in name if not (c.isalnum() or c in "_-")), name[0])
        raise error(
            f"{where} {name!r} contains {bad!r}: adapter names become module attributes and directory "
            "names, so they may hold only letters, digits, '_' and '-' (and not start with '-')"
        )
    if name.upper() in _WINDOWS_RESERVED:
        raise error(f"{where} {name!r} is a device name Windows reserves; it cannot name a directory")
    if hasattr(torch.nn.Module, name):
        raise error(
            f"{where} {name!r} is the name of an nn.Module attribute (torch would refuse it as a "
            "submodule name); pick another, e.g. f'{name}_adapter'"
        )
    return name


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_finite(value: Any, what: str, *, error: type[GraphloraError] = InputError) -> float:
    """``float(value)`` for a real number (not a bool) that is finite and fits a float32."""
    if not _is_real(value):
        raise error(f"{what} must be a number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise error(f"{what} = {value!r} is too large (it does not fit a float)") from None
    if not math.isfinite(number):
        raise error(f"{what} must be finite, got {value!r}")
    if abs(number) > FLOAT32_MAX:
        raise error(
            f"{what} = {value!r} overflows float32 (largest {FLOAT32_MAX:.4g}); LoRA and quantization "
            "scales are float32"
        )
    return number


def check_lora_alpha(
    alpha: Any, what: str, *, positive: bool = True, error: type[GraphloraError] = InputError
) -> float:
    """A LoRA alpha: finite, float32-sized (so ``alpha / rank`` is too, as rank >= 1) and, with
    ``positive``, > 0 (graphlora rules; PEFT configs may hold any finite alpha)."""
    number = check_finite(alpha, what, error=error)
    if positive and number <= 0:
        raise error(f"{what} must be > 0, got {alpha!r}")
    return number


def check_count(
    value: Any,
    what: str,
    *,
    minimum: int = 0,
    optional: bool = False,
    error: type[GraphloraError] = InputError,
) -> int | None:
    """An int (not a bool) ``>= minimum``; ``None`` passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        none = " or None" if optional else ""
        raise error(f"{what} must be an int >= {minimum}{none}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise error(f"{what} must be >= {minimum}, got {value}")
    return value


def check_lora_factor(
    tensor: Any, key: str, *, source: str = "adapter", error: type[GraphloraError] = AdapterError
) -> torch.Tensor:
    """A LoRA factor: a floating-point tensor with finite values.

    Integer, bool and complex factors are refused rather than cast (a cast would silently change
    what the adapter computes), and so are NaN/Inf, which would make every output NaN.
    """
    if not isinstance(tensor, torch.Tensor):
        raise error(f"{source}: {key} is a {type(tensor).__name__}, not a tensor")
    if not tensor.dtype.is_floating_point:
        raise error(
            f"{source}: {key} has dtype {str(tensor.dtype).removeprefix('torch.')}; LoRA factors are "
            "floating point (float32, float16, bfloat16, float64)"
        )
    if tensor.numel() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise error(f"{source}: {key} holds {bad} NaN/Inf value(s); a LoRA factor must be finite")
    return tensor
