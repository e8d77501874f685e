"""Where each part of a save goes in its directory, and where a load finds the adapter.

The saving and the loading side both need these names: a save decides what belongs to it (and so
what to carry over from an earlier directory), a load refuses a model checkpoint given as an
adapter and finds the adapter in every layout a save writes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from graphlora.io.peft_config import ADAPTER_CONFIG_NAME
from graphlora.io.safetensors_io import SAFE_WEIGHTS_NAME

__all__ = [
    "ADAPTERS_SUBDIR",
    "CONFIG_NAME",
    "QUANT_CONFIG_NAME",
    "QUANT_WEIGHTS_NAME",
    "is_weights_file",
    "resolve_adapter_dir",
]

#: Where the base+adapters layout puts the adapter (PEFT layout inside it).
ADAPTERS_SUBDIR = "adapters"
#: transformers' model config file.
CONFIG_NAME = "config.json"
#: A ``keep_quantized=True`` save: the rules and every quantized weight's encoding.
QUANT_CONFIG_NAME = "graphlora_quantization.json"
#: A ``keep_quantized=True`` save's tensors (codes and float tensors). Not ``model.safetensors``:
#: transformers' ``from_pretrained`` must find no float checkpoint there, or it would load the
#: float tensors and initialise every quantized weight at random (see ``checkpoint.quantized``).
QUANT_WEIGHTS_NAME = "graphlora_quantized.safetensors"


def _weights_family(name: str) -> str:
    stem = re.escape(name[: -len(".safetensors")])
    return rf"{stem}(-\d{{5}}-of-\d{{5}})?\.safetensors|{re.escape(name)}\.index\.json"


_WEIGHT_FILE = re.compile(f"{_weights_family(SAFE_WEIGHTS_NAME)}|{_weights_family(QUANT_WEIGHTS_NAME)}")


def is_weights_file(name: str) -> bool:
    """Whether ``name`` is a file of a base-model checkpoint: ``model.safetensors``, one of its
    shards (``model-00001-of-00003.safetensors``) or the shard index, or the same files of a
    keep-quantized save (``graphlora_quantized.safetensors`` ...)."""
    return _WEIGHT_FILE.fullmatch(name) is not None


def resolve_adapter_dir(
    adapter_dir: str | os.PathLike[str], adapter_name: str | None = None, subfolder: str | None = None
) -> Path:
    """The directory holding ``adapter_config.json`` for a load.

    ``adapter_dir`` (joined with ``subfolder``) if it holds an adapter, as PEFT reads it; else, so
    every graphlora save loads from its top directory, ``<dir>/<adapter_name>`` (PEFT's layout for
    a non-default adapter), ``<dir>/adapters`` and ``<dir>/adapters/<adapter_name>`` (the
    base+adapters layout). When none holds an adapter, ``adapter_dir`` itself, so the reader's
    "missing file" error names it.
    """
    root = Path(adapter_dir)
    if subfolder:
        root = root / subfolder
    candidates = [root]
    if adapter_name:
        candidates.append(root / adapter_name)
    candidates.append(root / ADAPTERS_SUBDIR)
    if adapter_name:
        candidates.append(root / ADAPTERS_SUBDIR / adapter_name)
    for candidate in candidates:
        if (candidate / ADAPTER_CONFIG_NAME).is_file():
            return candidate
    return root
