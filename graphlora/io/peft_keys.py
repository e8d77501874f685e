"""The keys of PEFT's adapter files: what a tensor's name says about the module, the factor and
the adapter it belongs to, for every layout PEFT writes (linear and convolution factors, embedding
factors, DoRA magnitudes, ``target_parameters`` wrappers, a targeted embedding's own weight).

String splitting, not regexes: keys come from files and may be arbitrarily long.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PEFT_KEY_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------
# keys and shapes


def lora_keys(path: str) -> tuple[str, str]:
    """graphlora's own names for a module's factors: ``<path>.lora_A.weight``, ``<path>.lora_B.weight``."""
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


def peft_lora_keys(path: str) -> tuple[str, str]:
    """The keys PEFT writes in ``adapter_model.safetensors`` for a module path."""
    a, b = lora_keys(path)
    return PEFT_KEY_PREFIX + a, PEFT_KEY_PREFIX + b


_FACTORS = {"lora_A": "A", "lora_B": "B"}


def parse_lora_key(key: str) -> tuple[str, str, str | None] | None:
    """``(module_path, "A" | "B", adapter_name or None)`` for a LoRA factor key (with or without
    the ``base_model.model.`` prefix), or ``None`` if ``key`` is not one:
    ``<path>.lora_A.weight`` or ``<path>.lora_A.<adapter>.weight`` (an adapter name has no dot).
    String splitting, not a regex: keys come from files and may be arbitrarily long."""
    stripped = key[len(PEFT_KEY_PREFIX) :] if key.startswith(PEFT_KEY_PREFIX) else key
    if not stripped.endswith(".weight"):
        return None
    return _split_factor(stripped[: -len(".weight")], _FACTORS)


def _split_factor(name: str, factors: Mapping[str, str]) -> tuple[str, str, str | None] | None:
    """``(path, factor, adapter or None)`` of ``<path>.<factor>`` or ``<path>.<factor>.<adapter>``."""
    head, _, last = name.rpartition(".")
    if last in factors and head:
        return head, factors[last], None
    path, _, factor = head.rpartition(".")
    if factor in factors and path and last:
        return path, factors[factor], last
    return None


EMBEDDING_FACTORS = {"lora_embedding_A": "A", "lora_embedding_B": "B"}


def peft_embedding_keys(path: str) -> tuple[str, str]:
    """The keys PEFT writes for an embedding module's factors (bare parameters, no ``.weight``)."""
    return tuple(f"{PEFT_KEY_PREFIX}{path}.{name}" for name in EMBEDDING_FACTORS)


def parse_embedding_key(key: str) -> tuple[str, str, str | None] | None:
    """``(module_path, "A" | "B", adapter name or None)`` for an embedding factor key
    (``<path>.lora_embedding_A`` or ``<path>.lora_embedding_A.<adapter>``), else None."""
    stripped = key[len(PEFT_KEY_PREFIX) :] if key.startswith(PEFT_KEY_PREFIX) else key
    return _split_factor(stripped, EMBEDDING_FACTORS)


#: How PEFT stores DoRA's magnitude: ``base_model.model.<path>.lora_magnitude_vector`` (no
#: ``.weight``; PEFT's save drops it), ``...lora_magnitude_vector.<adapter>`` with a name.
MAGNITUDE_KEY = "lora_magnitude_vector"


def peft_magnitude_key(path: str) -> str:
    """The key PEFT writes for a module's DoRA magnitude."""
    return f"{PEFT_KEY_PREFIX}{path}.{MAGNITUDE_KEY}"


def parse_magnitude_key(key: str) -> tuple[str, str | None] | None:
    """``(module_path, adapter name or None)`` for a DoRA magnitude key, else None (``.weight``
    after it, as in a PEFT model's state dict, is accepted too)."""
    stripped = key[len(PEFT_KEY_PREFIX) :] if key.startswith(PEFT_KEY_PREFIX) else key
    stripped = stripped[: -len(".weight")] if stripped.endswith(".weight") else stripped
    marker = f".{MAGNITUDE_KEY}"
    head, found, tail = stripped.rpartition(marker)
    if not found or not head or (tail and (not tail.startswith(".") or "." in tail[1:])):
        return None
    return head, tail[1:] or None


BASE_LAYER_SUFFIX = ".base_layer.weight"


def parameter_owner(peft_path: str) -> str:
    """The module a ``target_parameters`` key path belongs to: the path without the
    ``.base_layer`` s of PEFT's nested wrappers (:func:`wrapper_paths`)."""
    while peft_path.endswith(".base_layer"):
        peft_path = peft_path[: -len(".base_layer")]
    return peft_path


def wrapper_paths(owner: str, targeted: list[str]) -> dict[str, str]:
    """PEFT's key path for each targeted parameter of module ``owner`` (``targeted`` in the
    module's definition order): one ``ParamWrapper`` per parameter, the first innermost, so the
    first of two is ``<owner>.base_layer`` and the second ``<owner>``."""
    return {name: owner + ".base_layer" * (len(targeted) - 1 - i) for i, name in enumerate(targeted)}


def targets_parameters_of(config: Mapping[str, Any], owner: str) -> bool:
    for name in config.get("target_parameters") or ():
        module = name.rpartition(".")[0]
        if owner == module or owner.endswith("." + module) or not module:
            return True
    return False
